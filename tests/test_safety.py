"""Safety: weights as safetensors, `.pt` only through torch.load(weights_only=True), no
trust_remote_code, and tokens never printed, logged, saved in configs or model cards."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, run_script

SOURCES = sorted([*REPO.glob("*.py"), *(REPO / "ddpm_hf").rglob("*.py")])
# The one unpickling we allow: the uint8 arrays shipped inside the installed animal-mnist package.
PICKLE_ALLOWED = {("ddpm_hf/data/images.py", "pickle.load")}


def _calls(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    return ast.unparse(func)


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_sources_were_found():
    assert {"train_ddpm.py", "steps.py", "pipeline.py"} <= {p.name for p in SOURCES}


def test_no_trust_remote_code_anywhere():
    offenders = [str(p.relative_to(REPO)) for p in SOURCES if "trust_remote_code" in p.read_text()]
    assert offenders == []


def test_torch_load_always_weights_only():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            if _name(call.func) == "torch.load":
                flag = _keyword(call, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert bad == []


def test_no_other_unpickling():
    found = set()
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "np.load", "numpy.load"):
                if name.endswith("np.load") or name == "numpy.load":  # numpy is safe unless pickles are allowed
                    flag = _keyword(call, "allow_pickle")
                    if flag is None or (isinstance(flag, ast.Constant) and flag.value is False):
                        continue
                found.add((str(path.relative_to(REPO)), name))
    assert found <= PICKLE_ALLOWED


def test_from_pretrained_reads_safetensors_and_save_pretrained_writes_them():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            if name.endswith(".from_pretrained"):
                flag = _keyword(call, "use_safetensors")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{path.relative_to(REPO)}:{call.lineno} {name} without use_safetensors=True")
            if name.endswith(".save_pretrained"):
                flag = _keyword(call, "safe_serialization")
                if isinstance(flag, ast.Constant) and flag.value is False:
                    bad.append(f"{path.relative_to(REPO)}:{call.lineno} {name} with safe_serialization=False")
    assert bad == []


def test_saved_weights_are_safetensors_and_checkpoints_need_no_unpickling(trained_pipeline):
    from accelerate.utils.other import TORCH_SAFE_GLOBALS
    from safetensors.torch import load_file

    files = [p for p in trained_pipeline.rglob("*") if p.is_file()]
    assert (trained_pipeline / "unet" / "diffusion_pytorch_model.safetensors").exists()
    for path in files:
        if path.suffix == ".safetensors":
            assert load_file(str(path))  # readable as safetensors
    pickled = sorted(
        str(p.relative_to(trained_pipeline)) for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")
    )
    # Only Accelerate's optimiser and RNG states, in checkpoints; no custom_checkpoint_*.pkl (those
    # Accelerate unpickles with weights_only=False): our EMA and LR schedule are safetensors + JSON.
    assert pickled and all(
        Path(p).parts[0] == "checkpoints" and Path(p).name in ("optimizer.bin", "random_states_0.pkl") for p in pickled
    ), pickled
    for name in pickled:  # and both load with weights_only=True (Accelerate adds only numpy's RNG types)
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            assert torch.load(trained_pipeline / name, weights_only=True, map_location="cpu")
    for checkpoint in (trained_pipeline / "checkpoints").iterdir():
        assert (checkpoint / "ema.safetensors").exists() and (checkpoint / "trainer_state.json").exists()


SECRETS = {
    "--hub_token": "hf_CliSecretDoNotLeak123",
    "HF_TOKEN": "hf_EnvSecretDoNotLeak456",
    "WANDB_API_KEY": "WandbSecretDoNotLeak789",
}


def _leaks(text_or_bytes) -> list:
    data = text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode()
    return [name for name, secret in SECRETS.items() if secret.encode() in data]


@pytest.mark.slow
def test_tokens_are_never_printed_logged_saved_or_put_in_model_cards(tmp_path):
    out = tmp_path / "run"
    env = {"HF_TOKEN": SECRETS["HF_TOKEN"], "WANDB_API_KEY": SECRETS["WANDB_API_KEY"], "OMP_NUM_THREADS": "1"}
    # tensorboard logs the run's config as hparams: a real tracker file to search.
    proc = run_script(
        "train_ddpm.py",
        "--dataset",
        "animalmnist",
        "--max_train_samples",
        "16",
        "--batch_size",
        "8",
        "--timesteps",
        "100",
        "--sample_timesteps",
        "5",
        "--num_samples",
        "2",
        *TINY_MODEL,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--logging_steps",
        "1",
        "--report_to",
        "tensorboard",
        "--hub_token",
        SECRETS["--hub_token"],
        "--output_dir",
        out,
        env=env,
    )
    assert _leaks(proc.stdout + proc.stderr) == []
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.parts[-2:-1] == ("logs",) or "logs" in p.parts for p in files), "no tracker files were written"
    assert {p.name for p in files} >= {
        "train_config.json",
        "ddpm_hf_config.json",
        "train_log.jsonl",
        "trainer_state.json",
    }
    assert {str(p.relative_to(out)): _leaks(p.read_bytes()) for p in files if _leaks(p.read_bytes())} == {}

    from ddpm_hf.hub.upload import build_model_card

    card = build_model_card(out, "nobody/ddpm-test")
    assert "nobody/ddpm-test" in str(card) and _leaks(str(card)) == []

    # A failing run says what is wrong without echoing the token either.
    bad = run_script("train_ddpm.py", "--hub_token", SECRETS["--hub_token"], "--batch_size", "0", check=False, env=env)
    assert bad.returncode == 2 and _leaks(bad.stdout + bad.stderr) == []


@pytest.mark.parametrize("key", ["hub_token"])
def test_public_config_drops_secrets(key):
    from ddpm_hf.models.pipeline import public_config

    assert public_config({key: SECRETS["--hub_token"], "lr": 1e-3}) == {"lr": 1e-3}
