"""--log_level and the library's logging: a command's lines keep their texts and streams, a level hides what
is below it, the Hugging Face libraries follow it, and a program that never configures logging still runs."""

import logging
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, TINY_TRAIN, run_script, tiny_unet

from ddpm_hf.util.logs import FOLLOWERS, ON_STDERR, get_logger, setup_logging


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """An untrained 8 px pipeline: sampling it takes a moment."""
    from ddpm_hf.config.options import DDPMConfig
    from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler
    from ddpm_hf.models.pipeline import save_pipeline

    path = tmp_path_factory.mktemp("logging") / "pipe"
    noise = make_noise_scheduler(20, 1e-4, 0.02)
    save_pipeline(path, tiny_unet(size=8), make_sampler("ddim", noise.config), DDPMConfig(size=8).to_dict())
    return path


def _sample(pipe, out, *flags):
    from ddpm_hf.commands.sample_cli import main as sample_main

    sample_main(["--checkpoint", str(pipe), "--num_samples", "2", "--batch_size", "2", "--sample_timesteps", "2",
                 "--output_dir", str(out), *flags])  # fmt: skip


def _follower_levels() -> dict:
    """Each Hugging Face library's level: its verbosity if it is imported, else the variable it will read."""
    import importlib
    import os

    return {
        package: (
            logging.getLevelName(importlib.import_module(f"{package}.utils.logging").get_verbosity()).lower()
            if package in sys.modules
            else os.environ.get(variable)
        )
        for package, variable in FOLLOWERS.items()
    }


def test_lines_keep_their_text_and_stream(capsys):
    setup_logging("info")
    logger = get_logger("ddpm_hf.some_module")
    logger.info("wrote 2 new image(s)")
    logger.info("reference statistics computed", extra=ON_STDERR)
    logger.warning("notice: a notice")
    logger.warning("warning: a warning")
    logger.debug("a detail")
    captured = capsys.readouterr()
    assert captured.out == "wrote 2 new image(s)\n"
    assert captured.err == "reference statistics computed\nnotice: a notice\nwarning: a warning\n"
    get_logger("__main__").info("converted ...")  # a module run as python -m ddpm_hf.models.convert_gzoo
    assert capsys.readouterr().out == "converted ...\n"


def test_error_level_hides_notices_and_debug_shows_details(capsys):
    logger = get_logger("ddpm_hf.some_module")
    setup_logging("error")
    logger.info("progress")
    logger.warning("notice: hidden at error")
    logger.error("an error line")
    assert capsys.readouterr() == ("", "an error line\n")
    setup_logging("debug")  # a second call replaces the level (one handler, no line printed twice)
    logger.debug("a detail")
    assert capsys.readouterr() == ("", "a detail\n")


@pytest.mark.parametrize("level", ["debug", "warning", "error"])
def test_hugging_face_libraries_follow_the_level(level):
    setup_logging(level)
    assert set(_follower_levels().values()) == {level}


def test_at_info_the_hugging_face_libraries_keep_their_own_level():
    before = _follower_levels()
    setup_logging("info")
    assert _follower_levels() == before


def test_sample_at_debug_then_warning_from_the_config_file(pipe, tmp_path, capsys):
    import diffusers

    _sample(pipe, tmp_path / "debug", "--log_level", "debug")
    captured = capsys.readouterr()
    assert "sampler: DDIMScheduler, 2 steps" in captured.err
    assert f"wrote 2 new image(s) (0 already there) to {tmp_path / 'debug'}" in captured.out
    assert diffusers.utils.logging.get_verbosity() == logging.DEBUG

    config = tmp_path / "quiet.yaml"
    config.write_text("log_level: warning\n")
    _sample(pipe, tmp_path / "quiet", "--config", str(config))
    captured = capsys.readouterr()
    assert captured.out == "" and "sampler:" not in captured.err
    assert (tmp_path / "quiet" / "grid.png").exists()
    assert diffusers.utils.logging.get_verbosity() == logging.WARNING


def test_sample_at_the_default_level_shows_progress_but_no_details(pipe, tmp_path, capsys):
    _sample(pipe, tmp_path / "out")
    captured = capsys.readouterr()
    assert "wrote 2 new image(s)" in captured.out and "sampler:" not in captured.err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--log_level", "loud"], "error: argument --log_level: invalid choice: 'loud'"),
        (["--config", "{config}"], "error: config file {config}: 'log_level' must be one of debug, info, warning"),
    ],
)
def test_a_bad_level_is_one_line(args, expected, tmp_path, capsys):
    from ddpm_hf.commands.sample_cli import main as sample_main

    config = tmp_path / "bad.yaml"
    config.write_text("log_level: loud\n")
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--checkpoint", str(tmp_path), *(a.format(config=config) for a in args)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected.format(config=config))


@pytest.mark.slow
def test_train_at_warning_keeps_the_notices_and_drops_the_progress(tmp_path):
    proc = run_script(
        "train_ddpm.py", *TINY_TRAIN, "--max_train_samples", "32", "--max_train_steps", "1",
        "--output_dir", tmp_path / "out", "--log_level", "warning",
    )  # fmt: skip
    assert proc.stdout == ""  # no "data: ...", no "saved the pipeline ..."
    assert "\nnotice: the noise schedule keeps " in "\n" + proc.stderr
    assert (tmp_path / "out" / "model_index.json").exists()


LIBRARY_USE = """
    import sys
    from PIL import Image
    from ddpm_hf.data.sets import load_query_images
    from ddpm_hf.util.logs import get_logger

    Image.new("RGB", (20, 20), "white").save(sys.argv[1] + "/white.png")
    names, images = load_query_images(sys.argv[1], 1, 16)  # no Accelerator, no PartialState: still logs
    get_logger("ddpm_hf.program").info("an info line: Python's default shows warnings only")
    print(tuple(images.shape))
"""


@pytest.mark.parametrize("rank", [None, "1"])
def test_library_use_without_configuring_logging(rank, tmp_path):
    """Python's defaults: warnings on stderr, info hidden; under a launcher, the main process alone speaks."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "RANK"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LIBRARY_USE), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, **({"RANK": rank} if rank else {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "(1, 1, 16, 16)\n"
    notices = [
        f"notice: --images {tmp_path} has 3-channel images; converted to grayscale for the 1-channel model",
        f"notice: --images {tmp_path} has 20 px images; shrunk to the model's 16 px",
    ]
    assert proc.stderr.splitlines() == ([] if rank else notices)
