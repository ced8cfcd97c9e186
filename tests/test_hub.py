"""Pushing to the Hub, offline: a real huggingface_hub client talks to tests/hub_server.py on 127.0.0.1.

One tiny training run pushes with --hub_strategy every_save: the snapshot at step 2 goes
up, the final push fails (the server refuses further commits), and `python -m
ddpm_hf.commands.push` then retries. The dummy token is passed on the command line and must appear
in no file, no uploaded file and no output.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO, TINY_TRAIN
from hub_server import HubServer
from huggingface_hub import ModelCard

from ddpm_hf.hub.upload import push_output, upload_files
from ddpm_hf.util.errors import DDPMError

TOKEN = "hf_dummyTestToken0123456789abcdef"
PIPELINE_FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "ddpm_hf_config.json",
    "train_config.json",
    "train_log.jsonl",
    "README.md",
}


@pytest.fixture(scope="module")
def hub():
    server = HubServer().start()
    yield server
    server.stop()


def hub_env(endpoint, tmp_path, token=None) -> dict:
    """The subprocess environment: online (HF_HUB_OFFLINE unset) against `endpoint`, with its own cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"))
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args, env, timeout=600):
    proc = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )
    assert TOKEN not in proc.stdout + proc.stderr
    return proc


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def dead_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def folder_state(folder) -> dict:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(hub, tmp_path_factory):
    """Train with --push_to_hub every_save; the server accepts one commit (the step-2 snapshot) only."""
    tmp = tmp_path_factory.mktemp("hub_train")
    out = tmp / "ddpm-tiny"
    hub.state.fail_after = 1
    proc = run(
        [
            REPO / "train_ddpm.py",
            *TINY_TRAIN,
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "2",
            "--output_dir",
            out,
            "--push_to_hub",
            "--hub_strategy",
            "every_save",
            "--hub_token",
            TOKEN,
            "--hub_private_repo",
        ],
        hub_env(hub.url, tmp),
    )
    hub.state.fail_after = None
    return out, proc


@pytest.fixture(scope="module")
def pushed(hub, trained, tmp_path_factory):
    """The retry: `python -m ddpm_hf.commands.push OUTPUT_DIR` with the token from $HF_TOKEN, repo id from the run."""
    out, _ = trained
    proc = run(["-m", "ddpm_hf.commands.push", out], hub_env(hub.url, tmp_path_factory.mktemp("push"), token=TOKEN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_failed_final_push_keeps_the_output_and_exits_nonzero(hub, trained):
    out, proc = trained
    assert proc.returncode == 1
    line = error_line(proc)
    assert "tester/ddpm-tiny" in line and "the local output is intact" in line
    assert f"python -m ddpm_hf.commands.push {out} --hub_model_id tester/ddpm-tiny" in line
    assert (out / "model_index.json").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not (out / "README.md").exists()  # written only after a successful push
    repo = hub.state.repos["tester/ddpm-tiny"]
    assert repo["visibility"] == "private"
    snapshot = repo["commits"][0]
    assert snapshot["message"] == "EMA pipeline at step 2"
    assert json.loads(snapshot["files"]["ddpm_hf_config.json"])["trained_steps"] == 2
    assert PIPELINE_FILES <= set(snapshot["files"])


@pytest.mark.slow
def test_retry_uploads_the_pipeline_and_nothing_else(hub, pushed):
    out, proc = pushed
    assert "pushed" in proc.stdout and "tester/ddpm-tiny" in proc.stdout
    repo = hub.state.repos["tester/ddpm-tiny"]
    assert len(repo["commits"]) == 2
    files = repo["commits"][-1]["files"]
    assert set(files) == PIPELINE_FILES | {"samples/epoch_0001.png"}
    assert (out / "checkpoints").is_dir()  # present locally, never uploaded
    assert json.loads(files["ddpm_hf_config.json"])["trained_steps"] == 3
    assert (
        files["unet/diffusion_pytorch_model.safetensors"]
        == (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert files["README.md"] == (out / "README.md").read_bytes()
    # The token only ever travelled as a header: in no uploaded file, no local file, no config.
    for commit in repo["commits"]:
        assert all(TOKEN.encode() not in content for content in commit["files"].values())
    assert all(TOKEN.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert json.loads((out / "train_config.json").read_text()).keys().isdisjoint({"hub_token"})
    assert hub.state.authorizations == {f"Bearer {TOKEN}"}


@pytest.mark.slow
def test_model_card_metadata_and_body(hub, pushed):
    card = ModelCard(hub.state.repos["tester/ddpm-tiny"]["commits"][-1]["files"]["README.md"].decode())
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    assert {"unconditional-image-generation", "ddpm"} <= set(data["tags"])
    assert data["datasets"] == ["ylecun/mnist"] and data["license"] == "mit"
    assert "model-index" not in data  # no metrics were computed for this run
    assert 'DiffusionPipeline.from_pretrained("tester/ddpm-tiny")' in card.text
    assert "![Samples from the EMA model](samples/epoch_0001.png)" in card.text
    assert "| `--max_train_steps` | 3 |" in card.text and "| `--dataset` | mnist5k |" in card.text
    assert "hub_token" not in card.content


@pytest.mark.slow
def test_from_pretrained_through_the_endpoint_gives_identical_weights(hub, pushed, tmp_path):
    """Stock diffusers loads the Hub copy; sample_ddpm.py takes the Hub id with --revision (the snapshot commit)."""
    out, _ = pushed
    snapshot = hub.state.repos["tester/ddpm-tiny"]["commits"][0]["oid"]
    check = (
        "import sys, torch\nfrom diffusers import DiffusionPipeline\nimport sample_ddpm\n"
        "hub = DiffusionPipeline.from_pretrained('tester/ddpm-tiny')\n"
        "local = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "a, b = hub.unet.state_dict(), local.unet.state_dict()\n"
        "print(type(hub).__name__, len(a), a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),"
        " hub.scheduler.config == local.scheduler.config)\n"
        "sample_ddpm.main(['--checkpoint', 'tester/ddpm-tiny', '--revision', sys.argv[2], '--num_samples', '2',"
        " '--sample_timesteps', '5', '--output_dir', sys.argv[3]])\n"
    )
    proc = run(["-c", check, out, snapshot, tmp_path / "samples"], hub_env(hub.url, tmp_path, token=TOKEN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, count, same_weights, same_scheduler = proc.stdout.splitlines()[0].split()[-4:]
    assert name == "DDIMPipeline" and int(count) > 50 and same_weights == "True" and same_scheduler == "True"
    assert (tmp_path / "samples" / "grid.png").exists()
    assert any(f"/resolve/{snapshot}/" in path for _, path in hub.state.requests)  # the revision was asked for


@pytest.mark.slow
def test_metrics_of_ood_and_fid_runs_enter_the_card(hub, pushed, tmp_path):
    out, _ = pushed
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "ood").mkdir()
    (copy / "ood" / "ood_results.json").write_text(
        json.dumps({"auroc": 0.9731, "fpr95": 0.125, "settings": {"dataset": "mnist5k", "out_dataset": "animalmnist"}})
    )
    fid_dir = copy / "fid_samples" / "mnist5k" / "ddpm_0.0_timesteps_10_ep1"
    fid_dir.mkdir(parents=True)
    (fid_dir / "fid.json").write_text(
        json.dumps({"fid": 41.5, "kid_mean": 0.031, "num_generated": 200, "reference": {"dataset": "mnist5k"}})
    )
    (fid_dir / "0.png").write_bytes(b"not uploaded")
    proc = run(
        ["-m", "ddpm_hf.commands.push", copy, "--hub_model_id", "tester/ddpm-metrics", "--hub_license", "apache-2.0"],
        hub_env(hub.url, tmp_path, token=TOKEN),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.state.repos["tester/ddpm-metrics"]["commits"][-1]["files"]
    assert "ood/ood_results.json" in files and f"{fid_dir.relative_to(copy).as_posix()}/fid.json" in files
    assert not any(p.endswith("0.png") for p in files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.model_name == "tester/ddpm-metrics"
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {"fid": 41.5, "kid": 0.031, "roc_auc": 0.9731, "fpr95": 0.125}
    assert "| OOD AUROC vs animalmnist | 0.9731 |" in card.text and "| FID | 41.50 |" in card.text


@pytest.mark.slow
def test_push_to_a_dead_endpoint_keeps_the_output(pushed, tmp_path):
    out, _ = pushed
    before = folder_state(out)
    proc = run(
        ["-m", "ddpm_hf.commands.push", out, "--hub_model_id", "tester/elsewhere"],
        hub_env(dead_endpoint(), tmp_path, TOKEN),
    )
    assert proc.returncode == 1
    line = error_line(proc)
    assert "ConnectError" in line and "the local output is intact" in line and "python -m ddpm_hf.commands.push" in line
    assert folder_state(out) == before


@pytest.mark.slow
def test_training_with_an_unreachable_hub_fails_before_training(tmp_path):
    out = tmp_path / "never"
    proc = run(
        [
            REPO / "train_ddpm.py",
            *TINY_TRAIN,
            "--max_train_steps",
            "3",
            "--output_dir",
            out,
            "--push_to_hub",
            "--hub_model_id",
            "tester/never",
            "--hub_token",
            TOKEN,
        ],
        hub_env(dead_endpoint(), tmp_path),
    )
    assert proc.returncode == 1
    assert "cannot create the Hub repository tester/never" in error_line(proc)
    assert not (out / "checkpoints").exists() and not (out / "model_index.json").exists()


@pytest.mark.slow
def test_upload_list_and_token_guard(tmp_path, trained):
    out, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for extra in (
        "logs/DDPM/events.out",
        "wandb/run/config.yaml",
        "best_fid/fid.json",
        "checkpoints/x/fid.json",
        ".pipeline.partial/model_index.json",
        "generated/0.png",
    ):
        (copy / extra).parent.mkdir(parents=True, exist_ok=True)
        (copy / extra).write_text("{}")
    assert set(upload_files(copy)) == PIPELINE_FILES - {"README.md"} | {"samples/epoch_0001.png"}
    with (copy / "train_log.jsonl").open("a") as f:
        f.write(json.dumps({"note": TOKEN}) + "\n")
    with pytest.raises(DDPMError, match="train_log.jsonl contains your Hub token"):
        push_output(copy, "tester/leak", token=TOKEN)  # refused before any request


def test_model_card_files_metrics_under_the_measured_dataset_and_records_what_ran(tmp_path):
    """Offline, no server: OOD metrics measured on mnist5k's test split are filed under mnist5k (not
    ylecun/mnist), trained steps/epochs are not listed as flags, mixed precision shows what ran, and the
    card has a limitations section."""
    from ddpm_hf.hub.upload import build_model_card

    out = tmp_path / "run"
    (out / "unet").mkdir(parents=True)
    (out / "scheduler").mkdir()
    (out / "ood").mkdir()
    (out / "unet" / "config.json").write_text(json.dumps({"in_channels": 1, "sample_size": 28}))
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"num_train_timesteps": 300, "beta_start": 0.0001, "beta_end": 0.02})
    )
    (out / "ddpm_hf_config.json").write_text(
        json.dumps(
            {
                "dataset": "mnist5k",
                "timesteps": 300,
                "sample_timesteps": 20,
                "batch_size": 32,
                "mixed_precision": "auto",
                "mixed_precision_used": "bf16",
                "trained_steps": 625,
                "trained_epochs": 5,
                "ddpm": 1.0,
            }
        )
    )
    (out / "ood" / "ood_results.json").write_text(
        json.dumps(
            {
                "auroc": 0.9612080000000001,
                "fpr95": 0.212,
                "settings": {"dataset": "mnist5k", "out_dataset": "animalmnist"},
            }
        )
    )
    card = build_model_card(out, "tester/ddpm-quickstart")
    data = card.data.to_dict()
    assert data["datasets"] == ["ylecun/mnist"]  # the training images are MNIST digits
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["roc_auc"].dataset_type == "mnist5k" and results["roc_auc"].dataset_split == "test"
    assert results["roc_auc"].metric_value == 0.9612
    assert "ylecun/mnist" not in {r.dataset_type for r in card.data.eval_results}
    assert "`--trained_steps`" not in card.text and "`--trained_epochs`" not in card.text
    assert "Trained for 625 optimiser steps (5 epochs)." in card.text
    assert "| `--mixed_precision` | bf16 (`--mixed_precision auto`) |" in card.text
    assert "## Limitations" in card.text
