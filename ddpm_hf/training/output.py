"""The training run's output folder: what may be written there, the log, and the final pipeline.

Checked before anything is created (a run that fails on its flags or data leaves the disk as it
was); `--overwrite_output_dir` clears what an earlier run left; a resume must keep the flags that
give its checkpoint a meaning (RESUME_FIXED).
"""

import json
import math
import os
from pathlib import Path

from diffusers import UNet2DModel

from ..data.images import same_dataset
from ..diffusion.sampling import make_sampler
from ..models.pipeline import save_pipeline
from ..util.errors import UsageError
from ..util.files import (
    append_line,
    check_writable,
    clear_earlier_run,
    make_output_dir,
    move_in,
    read_json,
    refuse_link,
    remove,
    write_text,
    writing,
)
from ..util.lock import ensure_not_in_use, lock_output_dir
from .checkpoints import CHECKPOINT_PREFIX, is_checkpoint_name, list_checkpoints, resolve_checkpoint

# Flags a resumed run must keep (the data, its order, the noise process, the batches): the checkpoint's
# optimiser, data position and schedule mean nothing under others. --n_epochs / --max_train_steps may change.
RESUME_FIXED = (
    "dataset",
    "size",
    "channels",
    "image_column",
    "dataset_config_name",
    "max_train_samples",
    "streaming",
    "shuffle_buffer_size",
    "pretrained_model_name_or_path",
    "model_config_name_or_path",
    "latent",
    "vae",
    "latent_mode",
    "cache_latents",
    "timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "rescale_betas_zero_snr",
    "prediction_type",
    "loss_type",
    "snr_gamma",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
)
SCHEDULE_KEYS = ("timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr", "prediction_type")
RESUME_ADVICE = (
    "resume with its flags (only --n_epochs and --max_train_steps may change), or train into another --output_dir"
)
RESUME_HINT = (
    "the checkpoints saved so far are intact; free some space, then continue with the same command plus "
    "--resume_from_checkpoint latest"
)


# What the run writes into (appends, folders) or reads back: a link planted under one of these names is refused.
TRACKER_PROJECT = "DDPM"  # the tracker's project name: tensorboard writes into OUTPUT_DIR/logs/DDPM
LINK_FREE = ("train_log.jsonl", "samples", "checkpoints", "best_fid", "logs", f"logs/{TRACKER_PROJECT}")


def check_output_dir(out: Path, overwrite: bool, resume, record: dict):
    """Refuse to clobber an earlier run and check that the folder `out` can be written, creating
    nothing yet: a run that fails on its data or flags leaves the disk as it was. `resume`:
    --resume_from_checkpoint; `record`: the run's flags (train_config.json), which a resume compares
    with the checkpoint's run. Returns `resume` resolved (a checkpoint folder, 'latest' or None)."""
    for name in LINK_FREE:  # refused before any step, not when the first log line or grid is written
        refuse_link(out / name)
    if not (overwrite or resume):
        if (out / "model_index.json").exists():
            raise UsageError(
                f"{out} already holds a trained pipeline; pass --overwrite_output_dir to replace it, "
                f"--resume_from_checkpoint latest to continue, or another --output_dir"
            )
        if list_checkpoints(out / "checkpoints"):
            raise UsageError(
                f"{out} holds checkpoints of an earlier run; pass --resume_from_checkpoint latest to continue it, "
                f"--overwrite_output_dir to start over, or another --output_dir"
            )
    resume = resolve_checkpoint(resume, out / "checkpoints")
    if resume and resume != "latest" and Path(resume).is_symlink():
        raise UsageError(
            f"--resume_from_checkpoint {resume} is a symbolic link (to {os.path.realpath(resume)}); a run never "
            f"resumes through a link: pass the folder itself"
        )
    if resume and resume != "latest" and not Path(resume).is_dir() and Path(resume).parent == out / "checkpoints":
        saved = ", ".join(p.name for p in list_checkpoints(out / "checkpoints")) or "none"
        raise UsageError(
            f"--resume_from_checkpoint {resume} is not a checkpoint folder: no {Path(resume).name} in "
            f"{out / 'checkpoints'} (saved there: {saved}); pass one of those or 'latest'"
        )
    if (
        resume
        and resume != "latest"
        and not (Path(resume).is_dir() and Path(resume).name.startswith(CHECKPOINT_PREFIX))
    ):
        raise UsageError(
            f"--resume_from_checkpoint {resume} is not a checkpoint folder "
            "(OUTPUT_DIR/checkpoints/checkpoint-N) or 'latest'"
        )
    if resume and resume != "latest" and not is_checkpoint_name(Path(resume).name):
        # the step a run resumes at is read from the folder's name, as Accelerate and diffusers name them
        raise UsageError(
            f"--resume_from_checkpoint {resume}: a checkpoint folder is named {CHECKPOINT_PREFIX}N after its step N; "
            f"rename it (e.g. to {CHECKPOINT_PREFIX}500) or pass 'latest'"
        )
    check_writable(out)
    if int(os.environ.get("RANK", "0")) == 0:  # the main process (the one that locks the folder)
        ensure_not_in_use(out)
    if resume:
        check_resume_flags(record, resume, out)
    return resume


def check_resume_flags(record: dict, resume: str, out: Path) -> None:
    """A resume continues the run that wrote the checkpoint: its data, diffusion and batch flags (RESUME_FIXED)
    must be the same, or the optimiser state, data position and schedule no longer fit (one line lists them)."""
    if resume == "latest" and not list_checkpoints(out / "checkpoints"):
        return  # nothing to continue: a new run
    saved_record = (out if resume == "latest" else Path(resume).parent.parent) / "train_config.json"
    try:
        saved = read_json(saved_record, "restore it, or resume with the flags of the run that wrote the checkpoints")
    except FileNotFoundError:
        return
    now = dict(record)
    if now.get("pretrained_model_name_or_path"):  # the same pretrained model brings the same schedule
        now.update({k: saved[k] for k in SCHEDULE_KEYS if k in saved})
    changed = [
        f"--{k} {_flag_value(now[k])} (the run used {_flag_value(saved[k])})"
        for k in RESUME_FIXED
        if k in saved and saved[k] != now[k] and not (k == "dataset" and same_dataset(saved[k], now[k]))
    ]
    if changed:
        raise UsageError(
            f"--resume_from_checkpoint continues the run in {saved_record.parent}, which used other "
            f"data/diffusion/batch flags: {'; '.join(changed)}; {RESUME_ADVICE}"
        )


def _flag_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def prepare_output_dir(out: Path, overwrite: bool, main: bool = True) -> Path:
    """Create the output folder `out` (as check_output_dir checked it); in the main process hold it for
    this run (lock.py) and, with --overwrite_output_dir, remove what an earlier run left there
    (files.clear_earlier_run)."""
    out = make_output_dir(out)
    if main:
        lock_output_dir(out, "train_ddpm.py")
    if main and overwrite:
        clear_earlier_run(out)
    return out


def trim_log(log_path: Path, step: int) -> None:
    """On resume, drop the log lines of steps after the checkpoint (they are trained again), and a
    line a kill cut short."""
    refuse_link(log_path)  # a linked log would be read, and its target's text copied into ours
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text(log_path, "".join(kept), "the training log (trimmed to the checkpoint)")


def append_log(log_path: Path, record: dict) -> None:
    append_line(log_path, json.dumps(record) + "\n", "a line of the training log", advice=RESUME_HINT)


def export_pipeline(parts, settings: dict, folder: Path, step: int, **record) -> None:
    """The training parts' EMA weights as a standard pipeline folder, its record saying what ran: the
    run's flags (`settings`), `step`, the resolved mixed precision, and `record` (e.g. the FID of best_fid/)."""
    final = UNet2DModel.from_config(parts.model.config)
    parts.ema.copy_to(final.parameters())
    trained = dict(
        trained_steps=step,
        trained_epochs=math.ceil(step / parts.steps_per_epoch),
        mixed_precision_used=parts.accelerator.mixed_precision,
        **record,
    )  # what ran: `auto` resolved
    save_pipeline(
        folder,
        final,
        make_sampler("ddim", parts.noise_scheduler.config),
        {**settings, **trained},
        vae=parts.vae,
    )


def save_pipeline_atomically(out: Path, parts, settings: dict, step: int, **record) -> None:
    """export_pipeline into a hidden folder, then move its entries in with model_index.json last: the
    file that marks a finished run appears only when everything else is in place (the final output,
    best_fid/)."""
    tmp = out / ".pipeline.partial"
    remove(tmp)  # rmtree leaves a planted link there, and the save would write through it
    kept = " and the earlier pipeline there is unchanged" if (out / "model_index.json").exists() else ""
    with writing(
        out,
        "the pipeline",
        cleanup=[tmp],
        advice=f"its partial files were removed{kept}; the last checkpoint is saved: free some space, then write "
        f"the pipeline with the same command plus --resume_from_checkpoint latest",
    ):
        export_pipeline(parts, settings, tmp, step, **record)
    move_in(tmp, out, last="model_index.json")
