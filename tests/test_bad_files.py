"""Bad files and output folders: locks, silent data loss, a full disk at every write point,
damaged files, input sanity. Each row of docs/bad-inputs.md is a row here, run by the harness of
test_bad_inputs.py: one `error:` (or `notice:` / `warning:`) line on stderr, its exit code, no traceback,
every file that was on disk before unchanged (checksums) except those the row may write, no partial
file or lock left behind, plus the row's own checks.

A full disk is simulated from outside the library by tests/faults.py --disk_full POINT[:N]: the N-th
write at POINT fails with ENOSPC after part of it is on disk. tests/test_reliability_cases.py also
fills a real (tmpfs) disk where the machine allows it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script
from test_bad_inputs import OOD, RESUME, SAMPLE, TRAIN, Row, _file, _finished_run, _pipeline, check_row, run_rows

DOC = REPO / "docs" / "bad-inputs.md"
RESUME_LATEST = [*RESUME, "--resume_from_checkpoint", "latest"]
_held_locks = []  # locks this (pytest) process holds for the rows that meet a live run
_fid_cache = {}


# ---- what each row finds on disk ---------------------------------------------------------------------


def _held(folder_name, with_pipeline=False):
    """A live run holds the folder: this test process takes its lock (it stays alive while the row runs)."""

    def setup(w, trained):
        from ddpm_hf.util.lock import OutputLock

        if with_pipeline:
            _pipeline(w, trained)
        (w / folder_name).mkdir()
        _held_locks.append(OutputLock(w / folder_name, "train_ddpm.py").acquire())

    return setup


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale_lock(w, trained):
    (w / "out").mkdir()
    info = dict(pid=_dead_pid(), host="", command="train_ddpm.py", started="2025-01-01T00:00:00")
    (w / "out" / ".ddpm_hf.lock").write_text(json.dumps(info))


def _earlier_samples(w, trained):
    _pipeline(w, trained)
    (w / "samples").mkdir()
    for name in ("0.png", "1.png", "grid.png"):
        (w / "samples" / name).write_bytes(b"an earlier run's image")


def _fid_folder(w, trained, change=None):
    """pipe/ and the --fid folder of SAMPLE made with --seed 1 (sampled once, then copied)."""
    _pipeline(w, trained)
    if "dir" not in _fid_cache:
        cache = Path(trained).parent / "fid_cache"
        _pipeline(cache, trained)
        run_script("sample_ddpm.py", *SAMPLE, "--fid", "--seed", "1", cwd=cache, env={"OMP_NUM_THREADS": "1"})
        _fid_cache["dir"] = cache / "samples"
    shutil.copytree(_fid_cache["dir"], w / "samples")
    (origin,) = (w / "samples").rglob("fid_origin.json")
    if change == "delete_origin":
        origin.unlink()
    elif change == "damage_origin":
        origin.write_text('{"seed": 1,')


def _fid(change=None):
    return lambda w, trained: _fid_folder(w, trained, change)


def _other_weights(w, trained):
    """pipe2/: the same pipeline with one weight changed (another model, same folder name for --fid)."""
    import torch
    from safetensors.torch import load_file, save_file

    _fid_folder(w, trained)
    _pipeline(w, trained, "pipe2")
    weights = w / "pipe2" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_in.bias"] = state["conv_in.bias"] + torch.ones_like(state["conv_in.bias"])
    save_file(state, str(weights), metadata={"format": "pt"})


def _damage(relative, how="garbage"):
    """A finished run (or a pipeline) with one file damaged, its size kept where `how` says so."""

    def setup(w, trained):
        _finished_run(w, trained) if relative.startswith("out/") else _pipeline(w, trained)
        path = w / relative
        data = bytearray(path.read_bytes())
        if how == "garbage":
            path.write_text("{ not json")
        elif how == "garbage_same_size":
            path.write_bytes(b"{" + b" " * (len(data) - 1))
        elif how == "truncate":
            path.write_bytes(bytes(data[: len(data) // 2]))
        elif how == "header":  # same size, the safetensors header length made absurd
            data[:8] = (2**62).to_bytes(8, "little")
            path.write_bytes(bytes(data))
        elif how == "middle":  # same size, the middle zeroed (a pickle that no longer loads)
            data[100:200] = bytes(100)
            path.write_bytes(bytes(data))

    return setup


def _images(metadata=None):
    def setup(w, trained):
        from PIL import Image

        (w / "images").mkdir()
        for i in range(4):
            Image.new("L", (16, 16), color=i * 40).save(w / "images" / f"{i}.png")
        if metadata is not None:
            (w / "images" / "metadata.csv").write_text(metadata)

    return setup


def _one_image(w, trained):
    from PIL import Image

    Image.new("L", (16, 16)).save(w / "img.png")


def _pth(w, trained):
    import torch

    _pipeline(w, trained)
    torch.save({"w": torch.zeros(2)}, w / "model.pth")


def _ood_sets(w, trained):
    """pipe/ and two 16-px grayscale image folders, at the model's format (no conversion notices)."""
    from PIL import Image

    _pipeline(w, trained)
    for name, shade in (("ind", 0), ("odd", 120)):
        (w / name).mkdir()
        for i in range(4):
            Image.new("L", (16, 16), color=shade + 20 * i).save(w / name / f"{i}.png")


OOD_SETS = [*OOD, "--dataset", "ind", "--out_dataset", "odd"]


def _earlier_ood(w, trained):
    _ood_sets(w, trained)
    (w / "ood").mkdir()
    for name in ("ood_results.json", "scores.csv", "histogram.png", "roc.png"):
        (w / "ood" / name).write_text(f"earlier {name}")


# ---- checks after the command ------------------------------------------------------------------------


def _nothing_created(path):
    def check(w, result):
        assert not (w / path).exists(), f"{path} was created"

    return check


def _lock_released(w, result):
    assert not (w / "out" / ".ddpm_hf.lock").exists() and (w / "out" / "model_index.json").exists()


def _checkpoints_whole(*names, absent=()):
    def check(w, result):
        from ddpm_hf.training.checkpoints import checkpoint_problem

        for name in names:
            assert checkpoint_problem(w / "out" / "checkpoints" / name) is None, name
        for name in absent:
            assert not (w / "out" / name).exists(), name

    return check


def _pngs_kept(*names):
    def check(w, result):
        (folder,) = (w / "samples" / "fid_samples").glob("*/*")
        assert sorted(p.name for p in folder.glob("*.png")) == sorted(names)

    return check


def _disk_full(point):
    return ("--disk_full", point)


TRAIN_OUT = ("out/*",)  # a training row may write anything inside its output folder (checked otherwise)
# Resuming a finished run re-saves its pipeline and configs; its checkpoints must stay as they were.
RESAVED = (
    "out/model_index.json",
    "out/ddpm_hf_config.json",
    "out/unet/*",
    "out/scheduler/*",
    "out/train_config.json",
    "out/train_log.jsonl",
)
ROWS = [
    # ---- silent data loss ----------------------------------------------------------------------------
    Row(
        "lock_train",
        "training into a folder a live run holds",
        "train_ddpm.py",
        TRAIN,
        1,
        ("out is in use by another run: process", "train_ddpm.py, started", "choose another --output_dir"),
        _held("out"),
    ),
    Row(
        "lock_sample",
        "sampling into a folder a live run holds",
        "sample_ddpm.py",
        SAMPLE,
        1,
        ("samples is in use by another run: process",),
        _held("samples", with_pipeline=True),
    ),
    Row(
        "lock_ood",
        "OOD scoring into a folder a live run holds",
        "ood_ddpm.py",
        OOD,
        1,
        ("ood is in use by another run: process",),
        _held("ood", with_pipeline=True),
    ),
    Row(
        "lock_stale",
        "a lock left by a process that died",
        "train_ddpm.py",
        TRAIN,
        0,
        ("taking over the lock of out left by process", "no longer running"),
        _stale_lock,
        kind="notice",
        may_change=TRAIN_OUT,
        check=_lock_released,
    ),
    Row(
        "sample_not_empty",
        "`sample_ddpm.py` into a folder that holds files",
        "sample_ddpm.py",
        SAMPLE,
        2,
        ("output folder samples is not empty (3 entries: 0.png, 1.png, grid.png)", "--overwrite_output_dir"),
        _earlier_samples,
    ),
    Row(
        "fid_other_seed",
        "`--fid` folder made with another `--seed`",
        "sample_ddpm.py",
        [*SAMPLE, "--fid"],
        2,
        ("holds 2 image(s) made differently (--seed: 1 there, 0 now)", "--overwrite_output_dir"),
        _fid(),
    ),
    Row(
        "fid_other_precision",
        "`--fid` folder made with another precision",
        "sample_ddpm.py",
        [*SAMPLE, "--fid", "--seed", "1", "--mixed_precision", "bf16"],
        2,
        ("made differently (--mixed_precision: no there, bf16 now)",),
        _fid(),
    ),
    Row(
        "fid_other_checkpoint",
        "`--fid` folder made by another checkpoint",
        "sample_ddpm.py",
        [*SAMPLE, "--fid", "--seed", "1", "--checkpoint", "pipe2"],
        2,
        ("made differently (--checkpoint: a model with other weights)",),
        _other_weights,
    ),
    Row(
        "fid_no_origin",
        "`--fid` folder without its origin record",
        "sample_ddpm.py",
        [*SAMPLE, "--fid", "--seed", "1"],
        2,
        ("origin unknown: no fid_origin.json",),
        _fid("delete_origin"),
    ),
    Row(
        "resume_changed_flags",
        "resuming with other `--batch_size` / `--timesteps`",
        "train_ddpm.py",
        [*RESUME_LATEST, "--batch_size", "16", "--timesteps", "200"],
        2,
        (
            "--timesteps 200 (the run used 100); --batch_size 16 (the run used 32)",
            "only --n_epochs and --max_train_steps may change",
        ),
        _finished_run,
    ),
    Row(
        "resume_changed_dataset",
        "resuming with another `--dataset`",
        "train_ddpm.py",
        [*RESUME_LATEST, "--dataset", "animalmnist"],
        2,
        ("--dataset animalmnist (the run used mnist5k)",),
        _finished_run,
    ),
    Row(
        "resume_rng_damaged",
        "resuming from a checkpoint whose RNG state cannot be loaded",
        "train_ddpm.py",
        RESUME_LATEST,
        0,
        (
            "cannot restore the random states from out/checkpoints/checkpoint-8/random_states_0.pkl",
            "no longer bit-exact",
        ),
        _damage("out/checkpoints/checkpoint-8/random_states_0.pkl", "middle"),
        kind="warning",
        may_change=RESAVED,
    ),
    # ---- a full disk at every write point ------------------------------------------------------------------
    Row(
        "disk_full_train_log",
        "disk full: training log",
        "train_ddpm.py",
        TRAIN,
        1,
        (
            "could not write a line of the training log to out (no space left on device)",
            "--resume_from_checkpoint latest",
        ),
        faults=_disk_full("log"),
        may_change=TRAIN_OUT,
        check=_nothing_created("out/train_log.jsonl"),
    ),
    Row(
        "disk_full_train_config",
        "disk full: `train_config.json`",
        "train_ddpm.py",
        TRAIN,
        1,
        ("could not write train_config.json to out (no space left on device)",),
        faults=_disk_full("config"),
        may_change=TRAIN_OUT,
        check=_nothing_created("out/train_config.json"),
    ),
    Row(
        "disk_full_checkpoint",
        "disk full: checkpoint",
        "train_ddpm.py",
        [*TRAIN, "--max_train_steps", "2", "--checkpointing_steps", "1"],
        1,
        (
            "could not write the checkpoint checkpoint-2 to out/checkpoints (no space left on device)",
            "the earlier checkpoints are intact (latest: checkpoint-1)",
            "--resume_from_checkpoint latest",
        ),
        faults=_disk_full("checkpoint:2"),
        may_change=TRAIN_OUT,
        check=_checkpoints_whole("checkpoint-1", absent=["model_index.json"]),
    ),
    Row(
        "disk_full_pipeline",
        "disk full: final pipeline",
        "train_ddpm.py",
        [*RESUME_LATEST, "--max_train_steps", "9"],
        1,
        (
            "could not write the pipeline to out (no space left on device)",
            "the earlier pipeline there is unchanged",
            "--resume_from_checkpoint latest",
        ),
        _finished_run,
        faults=_disk_full("pipeline"),
        may_change=("out/checkpoints/checkpoint-9/*", "out/train_log.jsonl", "out/train_config.json", "out/samples/*"),
        check=_checkpoints_whole("checkpoint-4", "checkpoint-8", "checkpoint-9"),
    ),
    Row(
        "disk_full_train_grid",
        "disk full: training sample grid",
        "train_ddpm.py",
        TRAIN,
        1,
        ("could not write the sample grid epoch_0001.png to out/samples (no space left on device)",),
        faults=_disk_full("grid"),
        may_change=TRAIN_OUT,
        check=_nothing_created("out/samples/epoch_0001.png"),
    ),
    Row(
        "disk_full_sample_png",
        "disk full: sampled PNG",
        "sample_ddpm.py",
        SAMPLE,
        1,
        ("could not write the image 1.png to samples (no space left on device)", "--overwrite_output_dir"),
        _pipeline,
        faults=_disk_full("png:2"),
        may_change=("samples/0.png",),
        check=_nothing_created("samples/1.png"),
    ),
    Row(
        "disk_full_sample_grid",
        "disk full: `grid.png`",
        "sample_ddpm.py",
        SAMPLE,
        1,
        ("could not write the image grid.png to samples (no space left on device)",),
        _pipeline,
        faults=_disk_full("grid"),
        may_change=("samples/*.png",),
        check=_nothing_created("samples/grid.png"),
    ),
    Row(
        "disk_full_fid_png",
        "disk full: `--fid` folder",
        "sample_ddpm.py",
        [*SAMPLE, "--fid", "--num_samples", "4"],
        1,
        ("could not write the image 2.png to samples/fid_samples/", "the images already written are kept"),
        _pipeline,
        faults=_disk_full("png:3"),
        may_change=("samples/fid_samples/*",),
        check=_pngs_kept("0.png", "1.png"),
    ),
    Row(
        "disk_full_fid_origin",
        "disk full: `--fid` origin record",
        "sample_ddpm.py",
        [*SAMPLE, "--fid"],
        1,
        ("could not write the FID folder's origin record to samples/fid_samples/",),
        _pipeline,
        faults=_disk_full("fid_origin"),
        check=_pngs_kept(),
    ),
    Row(
        "disk_full_ood",
        "disk full: OOD results",
        "ood_ddpm.py",
        [*OOD_SETS, "--overwrite_output_dir"],
        1,
        (
            "could not write the OOD results (ood_results.json, scores.csv, histogram.png, roc.png) to ood (no "
            "space left on device)",
            "the earlier results there are unchanged",
        ),
        _earlier_ood,
        faults=_disk_full("ood_results"),
    ),
    # ---- damaged files --------------------------------------------------------------------------------
    Row(
        "pipeline_config_json",
        "invalid JSON in a pipeline's `ddpm_hf_config.json`",
        "sample_ddpm.py",
        SAMPLE,
        1,
        ("pipe/ddpm_hf_config.json is damaged (not valid JSON: Expecting", "re-save the pipeline"),
        _damage("pipe/ddpm_hf_config.json"),
    ),
    Row(
        "pipeline_model_index_json",
        "invalid JSON in `model_index.json`",
        "sample_ddpm.py",
        SAMPLE,
        1,
        ("pipe/model_index.json is damaged (not valid JSON",),
        _damage("pipe/model_index.json"),
    ),
    Row(
        "pipeline_unet_config_json",
        "invalid JSON in `unet/config.json`",
        "ood_ddpm.py",
        OOD,
        1,
        ("pipe/unet/config.json is damaged (not valid JSON",),
        _damage("pipe/unet/config.json"),
    ),
    Row(
        "pipeline_weights_truncated",
        "a truncated safetensors file in a pipeline",
        "sample_ddpm.py",
        SAMPLE,
        1,
        ("pipe/unet/diffusion_pytorch_model.safetensors is damaged (SafetensorError",),
        _damage("pipe/unet/diffusion_pytorch_model.safetensors", "truncate"),
    ),
    Row(
        "resume_train_config_json",
        "invalid JSON in `train_config.json` on resume",
        "train_ddpm.py",
        RESUME_LATEST,
        1,
        ("out/train_config.json is damaged (not valid JSON",),
        _damage("out/train_config.json"),
    ),
    Row(
        "resume_ema_damaged",
        "a checkpoint's `ema.safetensors` damaged (same size)",
        "train_ddpm.py",
        [*RESUME, "--resume_from_checkpoint", "out/checkpoints/checkpoint-8"],
        1,
        ("checkpoint-8 is damaged or incomplete (ema.safetensors is damaged (SafetensorError",),
        _damage("out/checkpoints/checkpoint-8/ema.safetensors", "header"),
    ),
    Row(
        "resume_trainer_state_json",
        "a checkpoint's `trainer_state.json` damaged",
        "train_ddpm.py",
        [*RESUME, "--resume_from_checkpoint", "out/checkpoints/checkpoint-8"],
        1,
        ("checkpoint-8 is damaged or incomplete (trainer_state.json is not valid JSON)",),
        _damage("out/checkpoints/checkpoint-8/trainer_state.json", "garbage_same_size"),
    ),
    Row(
        "fid_origin_damaged",
        "a damaged `fid_origin.json`",
        "sample_ddpm.py",
        [*SAMPLE, "--fid", "--seed", "1"],
        1,
        ("fid_origin.json is damaged (not valid JSON", "--overwrite_output_dir"),
        _fid("damage_origin"),
    ),
    Row(
        "yaml_duplicate_key",
        "YAML config with a key twice",
        "train_ddpm.py",
        [*TRAIN, "--config", "bad.yaml"],
        2,
        ("config file bad.yaml: key 'lr' is given twice (lines 1 and 2)",),
        _file("bad.yaml", "lr: 0.1\nlr: 0.2\n"),
    ),
    Row(
        "yaml_int_key",
        "YAML config with a number as key (`1:`)",
        "train_ddpm.py",
        [*TRAIN, "--config", "bad.yaml"],
        2,
        ("key '1' on line 1 is read as the int 1, not a flag name",),
        _file("bad.yaml", "1: 2\n"),
    ),
    Row(
        "yaml_bool_key",
        "YAML config with `yes:` as key",
        "train_ddpm.py",
        [*TRAIN, "--config", "bad.yaml"],
        2,
        ("key 'yes' on line 1 is read as the bool True, not a flag name",),
        _file("bad.yaml", "yes: 3\n"),
    ),
    Row(
        "yaml_latin1",
        "YAML config saved as Latin-1",
        "train_ddpm.py",
        [*TRAIN, "--config", "bad.yaml"],
        2,
        ("config file bad.yaml is not UTF-8 text (byte 0xe9 at offset 12)", "save it as UTF-8"),
        lambda w, trained: (w / "bad.yaml").write_bytes(b"dataset: caf\xe9\n"),
    ),
    # ---- input sanity ------------------------------------------------------------------------------------
    Row(
        "lr_nan",
        "`--lr nan`",
        "train_ddpm.py",
        [*TRAIN, "--lr", "nan"],
        2,
        ("--lr must be a finite number, got nan",),
        check=_nothing_created("out"),
    ),
    Row(
        "lr_inf",
        "`--lr inf`",
        "train_ddpm.py",
        [*TRAIN, "--lr", "inf"],
        2,
        ("--lr must be a finite number, got inf",),
        check=_nothing_created("out"),
    ),
    Row(
        "ddpm_nan",
        "`--ddpm nan`",
        "sample_ddpm.py",
        [*SAMPLE, "--ddpm", "nan"],
        2,
        ("--ddpm must be a finite number, got nan",),
    ),
    Row(
        "num_samples_huge",
        "`--num_samples` beyond the disk",
        "sample_ddpm.py",
        [*SAMPLE, "--num_samples", "1000000000000"],
        2,
        (
            "--num_samples 1000000000000 (1x16x16 images) needs about 1,280.0 TB of disk for the PNGs but samples has",
            "lower --num_samples",
        ),
        _pipeline,
    ),
    Row(
        "train_num_samples_huge",
        "`train_ddpm.py --num_samples` above the grid size",
        "train_ddpm.py",
        [*TRAIN, "--num_samples", "100000000"],
        2,
        ("--num_samples 100000000 is the size of the training sample grids; use at most 256",),
        check=_nothing_created("out"),
    ),
    Row(
        "checkpoint_pth",
        "an existing `.pth` file as `--checkpoint`",
        "sample_ddpm.py",
        [*SAMPLE, "--checkpoint", "model.pth"],
        2,
        (
            "checkpoint file model.pth is a .pth file; --checkpoint takes a pipeline folder",
            "an original GenerativeZoo .pt file",
        ),
        _pth,
    ),
    Row(
        "checkpoint_safetensors",
        "a pipeline's `.safetensors` file as `--checkpoint`",
        "sample_ddpm.py",
        [*SAMPLE, "--checkpoint", "pipe/unet/diffusion_pytorch_model.safetensors"],
        2,
        ("is a .safetensors file", "it is part of the pipeline folder pipe: pass that folder"),
        _pipeline,
    ),
    Row(
        "checkpoint_pth_missing",
        "a missing `dir/x.pth` as `--checkpoint`",
        "sample_ddpm.py",
        [*SAMPLE, "--checkpoint", "dir/x.pth"],
        2,
        ("checkpoint file dir/x.pth does not exist; --checkpoint takes a pipeline folder",),
    ),
    Row(
        "dataset_is_file",
        "`--dataset` naming an image file",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "img.png"],
        2,
        ("--dataset img.png is a file; pass the folder that holds the images",),
        _one_image,
    ),
    Row(
        "metadata_malformed",
        "an image folder with a malformed `metadata.csv`",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "images"],
        2,
        ("images/metadata.csv is malformed (ParserError", "remove it (an image folder needs no metadata file)"),
        _images('file_name,label\n0.png,1\n"unterminated\n'),
    ),
    Row(
        "metadata_missing_files",
        "a `metadata.csv` naming files that do not exist",
        "train_ddpm.py",
        [*TRAIN, "--dataset", "images"],
        2,
        ("images/metadata.csv names 1 file(s) that do not exist (5.png)",),
        _images("file_name,label\n5.png,1\n"),
    ),
    Row(
        "out_dataset_same",
        "`--out_dataset` equal to `--dataset`",
        "ood_ddpm.py",
        [*OOD_SETS, "--out_dataset", "ind"],
        0,
        ("--out_dataset ind is the in-distribution --dataset", "AUROC near 0.5"),
        _ood_sets,
        kind="notice",
        may_change=("ood/*",),
    ),
]
ROW_IDS = [row.id for row in ROWS]
assert len(set(ROW_IDS)) == len(ROWS)


@pytest.fixture(scope="module")
def results(tmp_path_factory, trained_pipeline):
    try:
        yield run_rows(ROWS, tmp_path_factory.mktemp("bad_files"), trained_pipeline)
    finally:
        for held in _held_locks:
            held.release()


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_bad_file_row(row, results):
    check_row(row, results[row.id])


def test_docs_table_lists_every_row():
    """Each row is in docs/bad-inputs.md (the rows the README's table gains)."""
    table = DOC.read_text()
    for row in ROWS:
        assert f"| {row.label} |" in table, f"{DOC.name} lacks the row {row.label!r}"
