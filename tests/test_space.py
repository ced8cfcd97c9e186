"""app.py (the Gradio Space) driven in a real browser: headless Chromium through Selenium.

Installs what it needs when missing (the `space` extra with pip, Debian's chromium and chromium-driver with
apt-get); it skips only when an install is impossible (not root, no package source).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO

from ddpm_hf.data.images import DataSettings
from ddpm_hf.data.sets import load_set

SHIPPED = REPO / "pretrained" / "ddpm-mnist5k"
DOCS = REPO / "docs"
WAIT = 240  # seconds for one page event on 2 shared CPU cores (the first sampling includes torch's warm-up)

pytestmark = pytest.mark.slow


def _run(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"cannot install {what} ({' '.join(cmd[:4])} exited {proc.returncode}): {proc.stderr[-400:]}")


def ensure_space_extra():
    """The `space` extra's packages, at the tested pins; not `pip install -e .[space]`, which would re-point
    an editable install shared with other checkouts."""
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError:
        import tomllib  # here: Python 3.11+, and only when something is missing

        extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["space"]
        locks = ["-c", str(REPO / "requirements.txt"), "-c", str(REPO / "requirements-space.txt")]
        _run([sys.executable, "-m", "pip", "install", "-q", *extra, *locks], "the space extra")


def ensure_chromium() -> tuple:
    """(chromium, chromedriver) paths, installed with apt-get when not on PATH."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("chromium/chromedriver are not on PATH and apt-get cannot install them (not root)")
        _run(["apt-get", "update", "-q"], "chromium (apt-get update)")
        _run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], "chromium and chromium-driver")
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    ensure_space_extra()
    chromium, chromedriver = ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)  # given paths: no Selenium Manager
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits(channels, size, n, split="train"):
    return load_set("mnist5k", split, DataSettings(), channels, size, n, "digits")


def fit_detector(pipeline, folder, size, n):
    import ddpm_hf

    ddpm_hf.OODDetector.fit(str(pipeline), digits(1, size, n), score="hidden", batch_size=32).save(folder)
    return folder


# The tiny model exercises every code path; the shipped model's run rewrites docs/space-*.png, so it runs only
# when asked: DDPM_HF_SCREENSHOTS=1 pytest -m slow tests/test_space.py
MODELS = ["tiny", "shipped"] if os.environ.get("DDPM_HF_SCREENSHOTS") == "1" else ["tiny"]


@pytest.fixture(scope="module", params=MODELS)
def served(request, tmp_path_factory):
    """(url, digit PNG, model name) of app.py serving a model with a fitted detector, on a free local port."""
    from PIL import Image
    from test_ood import random_pipeline

    tmp = tmp_path_factory.mktemp(f"space-{request.param}")
    if request.param == "tiny":  # random 16-px weights: every code path, in seconds
        pipeline, detector = random_pipeline(tmp / "pipe"), None
        detector = fit_detector(pipeline, tmp / "detector", 16, 40)
    else:  # the reference model: the screenshots in docs/
        # relative to the repository (the app runs there): the page title shows the name a user would type
        pipeline, detector = SHIPPED.relative_to(REPO), fit_detector(SHIPPED, tmp / "detector", 28, 200)
    digit = tmp / "digit.png"
    Image.fromarray(digits(1, 28, 1, "test")[0, 0].numpy()).save(digit)
    port = free_port()
    cmd = [sys.executable, str(REPO / "app.py"), "--checkpoint", str(pipeline), "--detector", str(detector)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env, cwd=REPO
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, proc, tmp / "app.log")
        yield url, digit, request.param, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def wait_for_server(url, proc, log, timeout=WAIT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"app.py did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def shown_image_width(driver, elem_id):
    """naturalWidth of the decoded <img> inside the component (0 while none is shown or it did not decode)."""
    script = "const i = document.querySelector(arguments[0]); return i && i.complete ? i.naturalWidth : 0;"
    return driver.execute_script(script, f"#{elem_id} img")


def text_of(driver, elem_id):
    script = "const e = document.querySelector(arguments[0]); return e ? e.value : '';"
    return driver.execute_script(script, f"#{elem_id} textarea, #{elem_id} input")


def until(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.5).until(lambda d: condition(d), message=what)


def test_space_in_browser(browser, served):
    from selenium.webdriver.common.by import By

    url, digit, name, tmp = served
    browser.get(url)
    until(browser, lambda d: d.find_elements(By.ID, "generate"), "the Generate button")
    browser.find_element(By.ID, "generate").click()
    width = until(browser, lambda d: shown_image_width(d, "grid"), "a generated grid image")
    assert width >= 64
    shots = {"generate": tmp / "space-generate.png", "ood": tmp / "space-ood.png"}
    browser.save_screenshot(str(shots["generate"]))

    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'out of distribution')]").click()
    upload = until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload")
    upload[0].send_keys(str(digit))
    until(browser, lambda d: shown_image_width(d, "upload"), "the uploaded image's preview")
    browser.find_element(By.ID, "check").click()
    until(browser, lambda d: text_of(d, "p_value"), "the p-value")
    score, p_value = float(text_of(browser, "score")), float(text_of(browser, "p_value"))
    assert 0 < p_value <= 1 and score == score  # a number, not NaN
    assert text_of(browser, "flag").split(" (")[0] in ("in distribution", "out of distribution")
    until(browser, lambda d: shown_image_width(d, "recon"), "the reconstruction")
    browser.save_screenshot(str(shots["ood"]))
    if name == "shipped":  # the screenshots of the docs show the reference model
        for key, shot in shots.items():
            shutil.copyfile(shot, DOCS / f"space-{key}.png")
