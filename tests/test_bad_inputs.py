"""Every row of the bad-input table of docs/reliability.md: one `error:` line on stderr that
names the problem and the fix, exit code 2 for usage errors and 1 for runtime failures, no
traceback, and nothing already on disk changed (each row runs in its own folder, compared file by
file before and after).

Each row is its own process: one harness interpreter imports the scripts once, then forks a child
per row (its own exit code, stderr and library state) instead of paying ~5 s of imports per row.
"""

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
from conftest import REPO, TINY_MODEL, TINY_TRAIN, run_script, without_startup_notices

PROGRESS = re.compile(r"(it|examples|img|step|batch)/s\]|s/(it|step|batch)\]|\d+%\|")

TRAIN = [
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
    "--no_wandb",
    *TINY_MODEL,
    "--max_train_steps",
    "1",
    "--output_dir",
    "out",
]
SAMPLE = [
    "--checkpoint",
    "pipe",
    "--num_samples",
    "2",
    "--batch_size",
    "2",
    "--sample_timesteps",
    "5",
    "--output_dir",
    "samples",
]
# --recon_factor 0.4: t* = 39 is on the 5-step grid (99, 79, ..., 19) of the T=100 pipeline, so no run adds the
# notice of an off-grid t* (0.5's t* = 49 would be snapped to 39) to the one line a row expects.
OOD = [
    "--checkpoint",
    "pipe",
    "--dataset",
    "animalmnist",
    "--out_dataset",
    "mnist5k",
    "--max_samples",
    "4",
    "--batch_size",
    "4",
    "--sample_timesteps",
    "5",
    "--recon_factor",
    "0.4",
    "--output_dir",
    "ood",
]
# The flags of the session's trained pipeline (conftest.trained_pipeline): a resume must keep them.
RESUME = [*TINY_TRAIN, "--max_train_steps", "8", "--checkpointing_steps", "4", "--output_dir", "out"]


NO_TOKEN = "error: a Hub push needs a token with write access: pass --hub_token, set HF_TOKEN, or run `hf auth login`"

# ---- what each row finds on disk before it runs ------------------------------------------------------


def _pipeline(w, trained, name="pipe"):
    shutil.copytree(trained, w / name, ignore=shutil.ignore_patterns("checkpoints", "samples"))


def _finished_run(w, trained):
    shutil.copytree(trained, w / "out")


def _earlier_checkpoints(w, trained):
    shutil.copytree(trained / "checkpoints", w / "out" / "checkpoints")


def _damaged_checkpoint(w, trained):
    _finished_run(w, trained)
    weights = w / "out" / "checkpoints" / "checkpoint-8" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)


def _empty_folder(w, trained):
    (w / "images").mkdir()


def _unreadable_folder(w, trained):
    (w / "images").mkdir()
    for i in range(3):
        (w / "images" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG signature, then nothing


def _not_a_pipeline(w, trained):
    (w / "pipe").mkdir()
    (w / "pipe" / "notes.txt").write_text("not a model")


def _mismatched_pipeline(w, trained):
    _pipeline(w, trained)
    config = w / "pipe" / "unet" / "config.json"
    data = json.loads(config.read_text())
    data["block_out_channels"] = [64, 128]  # the weights on disk are for (32, 64)
    config.write_text(json.dumps(data))


def _mismatched_pt(w, trained):
    import torch

    # An original-layout state dict of a UNet with --model_channels 64, loaded with the flags of one of 32.
    torch.save(
        {
            "input_blocks.0.0.weight": torch.zeros(64, 1, 3, 3),
            "input_blocks.0.0.bias": torch.zeros(64),
            "out.2.weight": torch.zeros(1, 64, 3, 3),
            "out.2.bias": torch.zeros(1),
        },
        w / "model.pt",
    )


def _file(name, text):
    def setup(w, trained):
        (w / name).write_text(text)

    return setup


@dataclass
class Row:
    id: str
    label: str  # the docs/reliability.md table's "input" column
    script: str
    argv: list
    code: int
    needles: tuple  # what the error line must say (the problem and the fix)
    setup: Optional[Callable] = None
    env: dict = field(default_factory=dict)
    fresh: bool = False  # its env must be seen at import time: run it in a new interpreter, not a fork
    faults: tuple = ()  # tests/faults.py's flags: the faults injected into the row's process
    kind: str = "error"  # the one stderr line starts with "{kind}: " (a notice or warning row runs on)
    # globs of files (relative to the row's folder) the command may write; all others stay as they were
    may_change: tuple = ()
    check: Optional[Callable] = None  # check(folder, result): what else must hold afterwards

    def command(self) -> list:
        target = self.script.split() if self.script.startswith("-m ") else [str(REPO / self.script)]
        injector = [str(REPO / "tests" / "faults.py"), *self.faults, "--"] if self.faults else []
        return [sys.executable, *injector, *target, *self.argv]


ROWS = [
    Row(
        "unknown_dataset",
        "unknown dataset name",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "nosuchset"],
        2,
        ("unknown dataset 'nosuchset'", "mnist5k", "image folder"),
    ),
    Row(
        "hub_dataset_offline",
        "Hub dataset unreachable (offline)",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "nobody/no-such-dataset"],
        1,
        ("nobody/no-such-dataset", "offline"),
    ),
    Row(
        "folder_missing",
        "image folder missing",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "./no_such_folder"],
        2,
        ("no_such_folder does not exist",),
    ),
    Row(
        "folder_empty",
        "image folder empty",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "images"],
        2,
        ("images is empty", "put image files"),
        _empty_folder,
    ),
    Row(
        "folder_unreadable",
        "image folder whose files are all unreadable",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "images"],
        1,
        ("images", "read"),
        _unreadable_folder,
    ),
    Row(
        "size_not_divisible",
        "`--size` not divisible by the UNet's downsampling",
        "train_ddpm.py",
        [*TRAIN, "--size", "15"],
        2,
        ("--size 15 is not divisible by 2", "multiple of 2"),
    ),
    Row(
        "batch_size_zero",
        "`--batch_size` <= 0",
        "train_ddpm.py",
        [*TRAIN, "--batch_size", "0"],
        2,
        ("--batch_size must be a positive integer",),
    ),
    Row(
        "sample_timesteps_too_big",
        "`--sample_timesteps` > `--timesteps`",
        "train_ddpm.py",
        [*TRAIN, "--sample_timesteps", "200"],
        2,
        ("--sample_timesteps 200 is larger than --timesteps 100", "at most 100"),
    ),
    Row(
        "sample_timesteps_zero",
        "`--sample_timesteps` <= 0",
        "sample_ddpm.py",
        [*SAMPLE, "--sample_timesteps", "0"],
        2,
        ("--sample_timesteps must be a positive integer",),
    ),
    Row(
        "num_samples_zero",
        "`--num_samples` <= 0",
        "sample_ddpm.py",
        [*SAMPLE, "--num_samples", "0"],
        2,
        ("--num_samples must be a positive integer",),
    ),
    Row(
        "recon_factor_big",
        "`--recon_factor` > 1",
        "ood_ddpm.py",
        [*OOD, "--recon_factor", "1.5"],
        2,
        ("--recon_factor must be in (0, 1]",),
    ),
    Row(
        "recon_factor_zero",
        "`--recon_factor` <= 0",
        "ood_ddpm.py",
        [*OOD, "--recon_factor", "0"],
        2,
        ("--recon_factor must be in (0, 1]",),
    ),
    Row(
        "yaml_unknown_key",
        "YAML config with an unknown key",
        "train_ddpm.py",
        [*TRAIN, "--config", "bad.yaml"],
        2,
        ("unknown key(s) lr_rate", "flag names"),
        _file("bad.yaml", "lr_rate: 0.1\n"),
    ),
    Row(
        "yaml_wrong_type",
        "YAML config with a wrong type",
        "train_ddpm.py",
        [*TRAIN, "--config", "bad.yaml"],
        2,
        ("'batch_size' must be int", "'many'"),
        _file("bad.yaml", "batch_size: many\n"),
    ),
    Row(
        "yaml_missing",
        "YAML config file missing",
        "train_ddpm.py",
        [*TRAIN, "--config", "missing.yaml"],
        2,
        ("missing.yaml not found",),
    ),
    Row(
        "unknown_flag",
        "unknown flag",
        "train_ddpm.py",
        [*TRAIN, "--lr_rate", "0.1"],
        2,
        ("unrecognized arguments: --lr_rate", "--help"),
    ),
    Row(
        "output_not_writable",
        "output folder not writable",
        "train_ddpm.py",
        [*TRAIN, "--output_dir", "a_file/run"],
        2,
        ("output folder a_file/run is not writable", "choose another --output_dir"),
        _file("a_file", ""),
    ),
    Row(
        "no_wandb_and_tensorboard",
        "`--no_wandb` with `--report_to tensorboard`",
        "train_ddpm.py",
        [*TRAIN, "--report_to", "tensorboard"],
        2,
        ("--no_wandb", "--report_to tensorboard", "only one"),
    ),
    Row(
        "resume_and_overwrite",
        "`--resume_from_checkpoint` with `--overwrite_output_dir`",
        "train_ddpm.py",
        [*TRAIN, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"],
        2,
        ("--resume_from_checkpoint", "--overwrite_output_dir", "only one"),
    ),
    Row(
        "finished_output_dir",
        "training into a folder holding a finished pipeline",
        "train_ddpm.py",
        TRAIN,
        2,
        ("out already holds a trained pipeline", "--overwrite_output_dir", "--resume_from_checkpoint latest"),
        _finished_run,
    ),
    Row(
        "earlier_checkpoints",
        "training into a folder holding another run's checkpoints",
        "train_ddpm.py",
        TRAIN,
        2,
        ("out holds checkpoints of an earlier run", "--resume_from_checkpoint latest", "--overwrite_output_dir"),
        _earlier_checkpoints,
    ),
    Row(
        "resume_missing",
        "`--resume_from_checkpoint` path missing",
        "train_ddpm.py",
        [*TRAIN, "--resume_from_checkpoint", "out/checkpoints/checkpoint-99"],
        2,
        ("checkpoint-99 is not a checkpoint folder", "'latest'"),
    ),
    Row(
        "resume_damaged",
        "`--resume_from_checkpoint` naming a damaged checkpoint",
        "train_ddpm.py",
        [*RESUME, "--resume_from_checkpoint", "out/checkpoints/checkpoint-8"],
        1,
        ("checkpoint-8 is damaged or incomplete", "model.safetensors has", "resume from another checkpoint"),
        _damaged_checkpoint,
    ),
    Row(
        "resume_other_model",
        "resuming with model flags that do not match the checkpoint",
        "train_ddpm.py",
        [*RESUME, "--resume_from_checkpoint", "latest", "--model_channels", "64"],
        2,
        ("is of a different model (block_out_channels differ)", "flags of the run that wrote it"),
        _finished_run,
    ),
    Row(
        "checkpoint_missing",
        "checkpoint path missing",
        "sample_ddpm.py",
        [*SAMPLE, "--checkpoint", "./no_such_run"],
        2,
        ("no_such_run does not exist",),
    ),
    Row(
        "pt_missing",
        "`.pt` checkpoint file missing",
        "sample_ddpm.py",
        [*SAMPLE, "--checkpoint", "missing.pt"],
        2,
        ("missing.pt does not exist",),
    ),
    Row(
        "not_a_pipeline",
        "a folder that is not a pipeline",
        "sample_ddpm.py",
        SAMPLE,
        2,
        ("pipe is not a diffusers pipeline folder", "model_index.json"),
        _not_a_pipeline,
    ),
    Row(
        "pipeline_mismatch",
        "a pipeline whose weights do not match its config",
        "sample_ddpm.py",
        SAMPLE,
        1,
        ("pipeline folder pipe does not match its own config", "conv_in.bias", "re-save it"),
        _mismatched_pipeline,
    ),
    Row(
        "pt_mismatch",
        "a `.pt` whose shapes do not match the flags",
        "sample_ddpm.py",
        [*SAMPLE, "--checkpoint", "model.pt", "--dataset", "mnist5k"],
        2,
        ("model.pt does not match the given model flags", "pass the flags"),
        _mismatched_pt,
    ),
    Row(
        "hub_model_offline",
        "Hub model id unreachable (offline)",
        "sample_ddpm.py",
        [*SAMPLE, "--checkpoint", "nobody/no-such-model"],
        1,
        (
            "Hub model nobody/no-such-model is not in the Hugging Face cache",
            "HF_HUB_OFFLINE=1",
            "pass a pipeline folder",
        ),
    ),
    Row(
        "vae_unreachable",
        "VAE id unreachable (offline)",
        "train_ddpm.py",
        [*TRAIN, "--latent", "--vae", "nobody/no-such-vae"],
        1,
        ("nobody/no-such-vae", "--vae FOLDER"),
    ),
    # A Hub push, online (HF_HUB_OFFLINE is read at import: these rows get a fresh interpreter) towards a
    # closed port on this machine: with no token anywhere it must stop before any request.
    Row(
        "push_no_token",
        "Hub push without a token",
        "-m ddpm_hf.commands.push",
        ["out", "--hub_model_id", "nobody/ddpm-test"],
        2,
        (NO_TOKEN,),
        _finished_run,
        env=dict(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9"),
        fresh=True,
    ),
    Row(
        "train_push_no_token",
        "`--push_to_hub` without a token",
        "train_ddpm.py",
        [*TRAIN, "--push_to_hub", "--hub_model_id", "nobody/ddpm-test"],
        2,
        (NO_TOKEN,),
        env=dict(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9"),
        fresh=True,
    ),
    Row(
        "lpips_offline",
        "`--lpips` without the AlexNet weights, offline",
        "ood_ddpm.py",
        [*OOD, "--lpips"],
        1,
        ("--lpips needs torchvision's AlexNet weights", "alexnet-owt-7be5be79.pth", "or run without --lpips"),
        _pipeline,
    ),
]
ROW_IDS = [row.id for row in ROWS]
assert len(set(ROW_IDS)) == len(ROWS)


# ---- the harness: one interpreter, one fork per row ----------------------------------------------


def _harness() -> None:
    import importlib
    import importlib.util
    import traceback

    import faults

    rows = json.load(sys.stdin)
    mains = {}
    for script in sorted({r["script"] for r in rows}):
        if script.startswith("-m "):
            module = importlib.import_module(script[3:])
        else:
            spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        mains[script] = module.main
    # The scripts import torch and the library only after parsing their flags: import them here once,
    # so that every forked row shares them.
    for name in (
        "ddpm_hf.training.steps",
        "ddpm_hf.diffusion.sampling",
        "ddpm_hf.ood.scoring",
        "ddpm_hf.models.pipeline",
        "ddpm_hf.hub.upload",
        "ddpm_hf.metrics.fid",
    ):
        importlib.import_module(name)
    codes = []
    for row in rows:
        pid = os.fork()
        if pid == 0:  # the row's own process
            code = 1
            try:
                os.chdir(row["cwd"])
                os.environ.update(row["env"])
                faults.install(faults.parse(row["faults"]))
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    os.dup2(
                        os.open(
                            Path(row["cwd"]).parent / f"{Path(row['cwd']).name}.{name}",
                            os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                        ),
                        fd,
                    )
                sys.argv = [row["script"], *row["argv"]]
                mains[row["script"]](row["argv"])
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    json.dump(codes, sys.__stdout__)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and content hash (folders' own mtimes may change)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    changed: list
    folder: Path


def run_rows(rows, root: Path, trained) -> dict:
    """Set up each row in its own folder under `root`, run them all (forked from one harness
    interpreter, or fresh ones), and return {row id: Result} with the files changed on disk."""
    before = {}
    for row in rows:
        w = root / row.id
        w.mkdir()
        if row.setup:
            row.setup(w, trained)
        before[row.id] = snapshot(w)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    forked = [row for row in rows if not row.fresh]
    jobs = [
        dict(script=row.script, argv=row.argv, cwd=str(root / row.id), env=row.env, faults=list(row.faults))
        for row in forked
    ]
    proc = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1800,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    codes = dict(zip([row.id for row in forked], json.loads(proc.stdout)))
    for row in rows:
        if row.fresh:
            fresh = subprocess.run(
                row.command(), capture_output=True, text=True, cwd=root / row.id, timeout=600, env={**env, **row.env}
            )
            (root / f"{row.id}.stdout").write_text(fresh.stdout)
            (root / f"{row.id}.stderr").write_text(fresh.stderr)
            codes[row.id] = fresh.returncode
    out = {}
    for row in rows:
        w = root / row.id
        after = snapshot(w)
        changed = sorted(k for k in set(before[row.id]) | set(after) if before[row.id].get(k) != after.get(k))
        out[row.id] = Result(
            codes[row.id], (root / f"{row.id}.stdout").read_text(), (root / f"{row.id}.stderr").read_text(), changed, w
        )
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, trained_pipeline):
    return run_rows(ROWS, tmp_path_factory.mktemp("bad_inputs"), trained_pipeline)


def check_row(row, result) -> None:
    """One `{kind}:` line on stderr with the row's needles, its exit code, no traceback, and no file
    changed on disk but those the row may write (pre-existing files compared by checksum)."""
    report = f"exit {result.code}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, report
    # One line; besides it only the progress bars of work done before the failure (datasets, tqdm).
    lines = without_startup_notices(
        [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]
    )
    assert len(lines) == 1 and lines[0].startswith(f"{row.kind}: "), report
    for needle in row.needles:
        assert needle in lines[0], f"{needle!r} not in the {row.kind} line\n{report}"
    assert result.code == row.code, report
    unexpected = [k for k in result.changed if not any(fnmatch.fnmatch(k, glob) for glob in row.may_change)]
    assert unexpected == [], f"files changed on disk: {unexpected}"
    leftovers = [
        k for k in result.changed if re.search(r"(\.tmp|\.partial|\.lock)(/|$)", k) and (result.folder / k).exists()
    ]
    assert leftovers == [], f"partial files or a lock left behind: {leftovers}"
    if row.check:
        row.check(result.folder, result)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_bad_input(row, results):
    check_row(row, results[row.id])


def test_debug_shows_the_traceback(tmp_path):
    proc = run_script("train_ddpm.py", *TRAIN, "--dataset", "nosuchset", "--debug", check=False, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UsageError: unknown dataset 'nosuchset'" in proc.stderr


@pytest.mark.slow
def test_unreadable_images_in_a_folder_are_skipped_and_counted(tmp_path):
    """The documented choice: a folder with some unreadable or truncated images trains on the rest,
    with one warning per skipped file (the first three) and a count."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.new("L", (16, 16), color=i * 20).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    good = (folder / "0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    proc = run_script(
        "train_ddpm.py",
        *TRAIN,
        "--dataset",
        str(folder),
        "--output_dir",
        tmp_path / "out",
        env={"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert sum("skipping unreadable image" in line for line in warnings) == 2
    assert any("skipped 2 unreadable image(s) of 12" in line for line in warnings), proc.stderr[-2000:]
    assert "data: " in proc.stdout and "10 images of 1x16x16" in proc.stdout
    assert (tmp_path / "out" / "model_index.json").exists()


def test_docs_table_lists_every_row():
    section = (REPO / "docs" / "reliability.md").read_text()
    for row in ROWS:
        assert f"| {row.label} |" in section, f"docs/reliability.md's bad-input table lacks the row {row.label!r}"
    assert "(pending)" not in section


if __name__ == "__main__":
    _harness()
