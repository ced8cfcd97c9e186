"""The training loop: one loop, everything through Accelerate.

AdamW + the original's one-cycle LR (warm-up in epochs), huber/l2/l1 loss on the
predicted noise, an every-step EMA of the parameters (never wrapped in DDP), sample
grids from the EMA model, resumable checkpoints written atomically, a JSON-lines log,
and at the end a standard diffusers pipeline folder holding the EMA weights.
"""

import contextlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from .config import DDPMConfig
from .data import StreamingBatches, batch_loader, load_images, same_dataset, stream_images, to_model_range
from .errors import DDPMError, UsageError
from .files import (append_line, atomic_write, check_writable, make_output_dir, read_json, safetensors_problem,
                    simulate_disk_full, write_text, writing)
from .hub import TrainingPush
from .latent import encode_dataset, latent_format, load_training_vae, training_latents
from .lock import ensure_not_in_use, lock_output_dir
from .losses import elementwise_loss, min_snr_weights, per_image_loss, prediction_target
from .model import build_unet, count_parameters, unet_kwargs
from .pipeline import public_config, save_pipeline
from .sampling import GRID_MAX, generate, make_noise_scheduler, make_sampler, num_inference_steps, resolve_mixed_precision

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"
DISCARD_SUFFIX = ".discard"
MANIFEST = "ddpm_hf_checkpoint.json"  # written last; lists every file with its size
EMA_FILE = "ema.safetensors"
TRAINER_STATE = "trainer_state.json"  # data position, counters, EMA and LR-schedule state
# Flags a resumed run must keep (the data, its order, the noise process, the batches): the checkpoint's
# optimiser, data position and schedule mean nothing under others. --n_epochs / --max_train_steps may change.
RESUME_FIXED = ("dataset", "size", "channels", "image_column", "dataset_config_name", "max_train_samples", "streaming",
                "shuffle_buffer_size", "latent", "vae", "latent_mode", "cache_latents", "timesteps", "beta_start",
                "beta_end", "beta_schedule", "prediction_type", "loss_type", "snr_gamma", "batch_size",
                "gradient_accumulation_steps", "seed")
RESUME_ADVICE = "resume with its flags (only --n_epochs and --max_train_steps may change), or train into another --output_dir"


class PlainEMA(EMAModel):
    """diffusers' EMAModel with the original's rule by default: the same decay from the first update
    (the stock class uses decay 0, a plain copy, on its first step). With use_ema_warmup (--ema_warmup)
    the stock warm-up rule instead."""

    def get_decay(self, optimization_step: int) -> float:
        return super().get_decay(optimization_step) if self.use_ema_warmup else self.decay

    @torch.no_grad()
    def step(self, parameters) -> None:
        """shadow += (1 - decay) * (param - shadow) as one in-place foreach lerp: the stock update
        allocates temporaries the size of the model every step (benchmarks/run.py, components)."""
        parameters = list(parameters)
        if any(not p.requires_grad or p.dtype != s.dtype for p, s in zip(parameters, self.shadow_params)):
            return super().step(parameters)  # frozen or reduced-precision parameters: the stock rule
        self.optimization_step += 1
        self.cur_decay_value = decay = self.get_decay(self.optimization_step)
        torch._foreach_lerp_(self.shadow_params, parameters, 1 - decay)


def make_ema(unet, cfg: DDPMConfig) -> PlainEMA:
    """The every-step EMA: constant --ema_rate (the original), or diffusers' warm-up up to it."""
    return PlainEMA(unet.parameters(), decay=cfg.ema_rate, min_decay=0.0 if cfg.ema_warmup else cfg.ema_rate,
                    use_ema_warmup=cfg.ema_warmup, inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power,
                    foreach=True, model_cls=UNet2DModel, model_config=unet.config)


def make_optimizer(parameters, cfg: DDPMConfig) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel (one pass over all parameters) on CPU and CUDA, else the
    foreach one (benchmarks/run.py, components: fused is several times faster on CPU)."""
    parameters = list(parameters)
    fast = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in parameters) else {"foreach": True}
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.decay, **fast)


def diffusion_loss(unet, noise_scheduler, x0: torch.Tensor, cfg: DDPMConfig, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The objective of one batch (the trainer's and benchmarks/run.py's): Gaussian noise, uniform
    timesteps, the forward process, the UNet under `autocast()` (Accelerate's mixed precision), and
    the mean --loss_type between the UNet's output and its target (--prediction_type), each image's
    loss weighted by min-SNR-gamma under --snr_gamma."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    with autocast():
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t).sample
    target = prediction_target(noise_scheduler, x0, noise, t)
    if cfg.snr_gamma is None:
        return elementwise_loss(pred.float(), target, cfg.loss_type).mean()
    return (per_image_loss(pred.float(), target, cfg.loss_type) * min_snr_weights(noise_scheduler, t, cfg.snr_gamma)).mean()


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """--random_flip: each image mirrored left-right with probability 1/2 (the global RNG, so seeded
    and restored with the checkpoint's RNG states)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def check_output_dir(cfg: DDPMConfig) -> Path:
    """Refuse to clobber an earlier run and check that the folder can be written, creating
    nothing yet: a run that fails on its data or flags leaves the disk as it was."""
    out = Path(cfg.resolved_output_dir())
    if not (cfg.overwrite_output_dir or cfg.resume_from_checkpoint):
        if (out / "model_index.json").exists():
            raise UsageError(f"{out} already holds a trained pipeline; pass --overwrite_output_dir to replace it, "
                             f"--resume_from_checkpoint latest to continue, or another --output_dir")
        if list_checkpoints(out / "checkpoints"):
            raise UsageError(f"{out} holds checkpoints of an earlier run; pass --resume_from_checkpoint latest to continue it, "
                             f"--overwrite_output_dir to start over, or another --output_dir")
    resume = cfg.resume_from_checkpoint
    if resume and resume != "latest" and not (Path(resume).is_dir() and Path(resume).name.startswith(CHECKPOINT_PREFIX)):
        raise UsageError(f"--resume_from_checkpoint {resume} is not a checkpoint folder (OUTPUT_DIR/checkpoints/checkpoint-N) or 'latest'")
    check_writable(out)
    if int(os.environ.get("RANK", "0")) == 0:  # the main process (the one that locks the folder)
        ensure_not_in_use(out)
    if resume:
        check_resume_flags(cfg, out)
    return out


def check_resume_flags(cfg: DDPMConfig, out: Path) -> None:
    """A resume continues the run that wrote the checkpoint: its data, diffusion and batch flags (RESUME_FIXED)
    must be the same, or the optimiser state, data position and schedule no longer fit (one line lists them)."""
    resume = cfg.resume_from_checkpoint
    if resume == "latest" and not list_checkpoints(out / "checkpoints"):
        return  # nothing to continue: a new run
    record = (out if resume == "latest" else Path(resume).parent.parent) / "train_config.json"
    try:
        saved = read_json(record, "restore it, or resume with the flags of the run that wrote the checkpoints")
    except FileNotFoundError:
        return
    now = cfg.to_dict()
    changed = [f"--{k} {_flag_value(now[k])} (the run used {_flag_value(saved[k])})"
               for k in RESUME_FIXED if k in saved and saved[k] != now[k] and not (k == "dataset" and same_dataset(saved[k], now[k]))]
    if changed:
        raise UsageError(f"--resume_from_checkpoint continues the run in {record.parent}, which used other data/diffusion/batch "
                         f"flags: {'; '.join(changed)}; {RESUME_ADVICE}")


def _flag_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def prepare_output_dir(cfg: DDPMConfig, lock: bool = True) -> Path:
    """Create the output folder and, in the main process (`lock`), hold it for this run (lock.py)."""
    out = make_output_dir(check_output_dir(cfg))
    if lock:
        lock_output_dir(out, "train_ddpm.py")
    return out


def _test_kill(variable: str, step: int) -> None:
    """Test hook (README, section reliability): DDPM_HF_KILL_AT_STEP=N and DDPM_HF_KILL_DURING_SAVE=N
    SIGKILL this process after optimiser step N or halfway through saving checkpoint N, so a test
    can prove that a kill at a moment it chooses loses nothing."""
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(checkpoint_root: Path) -> list:
    """Checkpoints under their final name, oldest first (interrupted saves carry a suffix)."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=_checkpoint_step)


def _discard(path: Path) -> None:
    """Rename, then delete: a kill halfway through never leaves a half-deleted checkpoint-N."""
    doomed = path.with_name(path.name + DISCARD_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_manifest(folder: Path, step: int) -> None:
    """Written last: the list of every file of the checkpoint with its size."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(dict(step=step, files=files), indent=1))


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be trusted (None when its manifest matches its files)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its save did not finish"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return _content_problem(folder, files)


def _content_problem(folder: Path, files: dict) -> Optional[str]:
    """A checkpoint file of the right size whose content is damaged: safetensors headers and JSON are parsed."""
    for name in files:
        if name.endswith(".safetensors") and safetensors_problem(folder / name):
            return f"{name} is damaged ({safetensors_problem(folder / name)})"
        if name.endswith(".json"):
            try:
                read_json(folder / name)
            except DDPMError:
                return f"{name} is not valid JSON"
    return None


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, limit=None, write_extra=None) -> Path:
    """save_state (+ `write_extra(folder)`, + the manifest) into `checkpoint-N.partial`, then
    rename: a kill mid-save never leaves a checkpoint-N that `latest` would pick."""
    final = checkpoint_root / f"{CHECKPOINT_PREFIX}{step}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    kept = list_checkpoints(checkpoint_root)
    advice = (f"its partial files were removed and the earlier checkpoints are intact (latest: {kept[-1].name}); free some space, "
              f"then continue with the same command plus --resume_from_checkpoint latest") if kept else \
        "its partial files were removed; free some space and run the command again"
    with writing(checkpoint_root, f"the checkpoint {final.name}", cleanup=[partial], advice=advice):
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _test_kill("DDPM_HF_KILL_DURING_SAVE", step)
            simulate_disk_full("checkpoint")
            if write_extra:
                write_extra(partial)
            _write_manifest(partial, step)
    if accelerator.is_main_process:
        if final.exists():
            _discard(final)
        os.replace(partial, final)
        if limit:
            for old in list_checkpoints(checkpoint_root)[:-limit]:
                _discard(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, cfg: DDPMConfig, checkpoint_root: Path, read_extra=None) -> int:
    """Restore the requested checkpoint (`read_extra(folder)` restores what save_checkpoint's
    `write_extra` wrote); return the optimiser step it was saved at. With 'latest', a damaged
    checkpoint is reported in one line and the next older one is tried."""
    if cfg.resume_from_checkpoint == "latest":
        if accelerator.is_main_process and checkpoint_root.is_dir():
            for stale in sorted(checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}")):
                print(f"notice: removing {stale}, a checkpoint whose save was interrupted", file=sys.stderr)
                shutil.rmtree(stale, ignore_errors=True)
            for stale in checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*{DISCARD_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)  # an interrupted deletion of an old checkpoint
        accelerator.wait_for_everyone()
        candidates = list_checkpoints(checkpoint_root)[::-1]
        if not candidates:
            accelerator.print(f"no checkpoint in {checkpoint_root}; starting a new run")
            return 0
    else:
        candidates = [Path(cfg.resume_from_checkpoint)]  # a checkpoint folder: check_output_dir made sure
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                if read_extra:
                    read_extra(path)
                accelerator.load_state(str(path))
            except UsageError:
                raise
            except Exception as err:
                problem = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'cannot be loaded'}"
        if problem is not None:
            message = f"checkpoint {path} is damaged or incomplete ({problem})"
            if cfg.resume_from_checkpoint != "latest":
                raise DDPMError(f"{message}; resume from another checkpoint or 'latest'")
            print(f"warning: {message}; falling back to an older one", file=sys.stderr)
            continue
        _warn_rng_state(path, accelerator.process_index)
        accelerator.print(f"resumed from {path}")
        return _checkpoint_step(path)
    raise DDPMError(f"no loadable checkpoint in {checkpoint_root}; remove the damaged ones or start without --resume_from_checkpoint")


def _warn_rng_state(folder: Path, process_index: int) -> None:
    """Accelerate's load_state skips RNG states it cannot restore with only an INFO log line; say so,
    since the resumed run then draws other noise than the uninterrupted one."""
    import random

    import numpy as np
    from accelerate.utils import load

    path = folder / f"random_states_{process_index}.pkl"
    try:
        states = load(path, weights_only=True)  # as load_state reads it
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except Exception as err:
        print(f"warning: cannot restore the random states from {path} ({type(err).__name__}); training goes on, but the resume is no "
              f"longer bit-exact (other noise and timesteps than an uninterrupted run)", file=sys.stderr)


def _setup_tracker(cfg: DDPMConfig):
    tracker = cfg.tracker()
    if tracker == "wandb" and "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text()):
            # Never let wandb prompt for a login: log locally and say how to sync.
            os.environ["WANDB_MODE"] = "offline"
            print("notice: wandb is not logged in; logging offline (sync later with `wandb sync`, or pass --no_wandb)", file=sys.stderr)
    return None if tracker == "none" else tracker


def _log_grid(accelerator, tracker, grid: torch.Tensor, step: int) -> None:
    if tracker == "wandb":
        import wandb

        accelerator.get_tracker("wandb").log({"DDPM Samples": wandb.Image(grid)}, step=step)
    elif tracker == "tensorboard":
        accelerator.get_tracker("tensorboard").writer.add_image("DDPM Samples", grid, step)


def make_lr_scheduler(optimizer, cfg: DDPMConfig, total_steps: int, steps_per_epoch: int):
    """--lr_scheduler, stepped once per optimiser update: the original's OneCycleLR (from 1e-6 up to lr
    over --warmup epochs or --lr_warmup_steps, cosine back to 1e-6), or diffusers' get_scheduler."""
    if cfg.lr_scheduler != "one_cycle":
        from diffusers.optimization import get_scheduler

        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps or 0,
                             num_training_steps=total_steps)
    warm = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else cfg.warmup * steps_per_epoch
    warm = min(warm, total_steps - 1)
    # A one-step warm-up is a 0/0 inside OneCycleLR (its first phase would end at step 0): none instead.
    pct_start = warm / total_steps if warm > 1 else 0.0
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy="cos",
        cycle_momentum=False, div_factor=cfg.lr / 1e-6, final_div_factor=1)


class _StopRequest:
    """SIGINT/SIGTERM finish the current step, save a checkpoint and exit cleanly; during the final save
    (`final`), they let it finish."""

    def __init__(self, final: bool = False):
        self.requested, self.final = False, final
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C quits at once (checkpoints on disk stay whole)
        self.requested = True
        what = "finishing the final save first" if self.final else "stopping after this step and saving a checkpoint"
        print(f"\n{signal.Signals(signum).name}: {what}"
              + (" (Ctrl-C again quits at once)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _model_config(model) -> dict:
    return {k: v for k, v in json.loads(json.dumps(dict(model.config), default=str)).items() if not k.startswith("_")}


def _trim_log(log_path: Path, step: int) -> None:
    """On resume, drop the log lines of steps after the checkpoint (they are trained again), and a
    line a kill cut short."""
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text(log_path, "".join(kept), "the training log (trimmed to the checkpoint)")


_RESUME_HINT = ("the checkpoints saved so far are intact; free some space, then continue with the same command plus "
                "--resume_from_checkpoint latest")


def _append_log(log_path: Path, record: dict) -> None:
    append_line(log_path, json.dumps(record) + "\n", "a line of the training log", point="log", advice=_RESUME_HINT)


def _save_pipeline_atomically(out: Path, save) -> None:
    """`save(folder)` into a hidden folder, then move its entries in with model_index.json last: the
    file that marks a finished run appears only when everything else is in place."""
    tmp = out / ".pipeline.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    kept = " and the earlier pipeline there is unchanged" if (out / "model_index.json").exists() else ""
    with writing(out, "the pipeline", cleanup=[tmp],
                 advice=f"its partial files were removed{kept}; the last checkpoint is saved: free some space, then write "
                        f"the pipeline with the same command plus --resume_from_checkpoint latest"):
        save(tmp)
        simulate_disk_full("pipeline")
    for entry in sorted(tmp.iterdir(), key=lambda e: e.name == "model_index.json"):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


class _FidHook:
    """--eval_fid_every: FID/KID of the EMA model at epoch ends (main process), logged to
    train_log.jsonl and the tracker; --save_best_fid keeps the best pipeline in best_fid/."""

    def __init__(self, cfg: DDPMConfig, out: Path, accelerator, vae=None):
        from .fid import FIDEvaluator

        self.cfg, self.out, self.accelerator, self.vae = cfg, out, accelerator, vae
        self.best_dir = out / "best_fid"
        # Loads Inception now: missing weights fail before any training step.
        self.evaluator = FIDEvaluator(cfg, cfg.fid_reference or cfg.dataset, cfg.fid_reference_split,
                                      device=accelerator.device) if accelerator.is_main_process else None
        self.best = math.inf
        if cfg.resume_from_checkpoint and (self.best_dir / "fid.json").exists():
            self.best = read_json(self.best_dir / "fid.json", "restore it or delete best_fid/")["fid"]

    def __call__(self, model, ema, sampler, steps: int, epoch: int, global_step: int, noise_config) -> None:
        from .data import to_uint8
        from .fid import write_json

        cfg = self.cfg
        if self.evaluator is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.eval()
            # The same noise at every evaluation: FID changes come from the model, not the draw.
            images = generate(model, sampler, cfg.fid_num_samples, steps, eta=cfg.ddpm, seed=cfg.seed,
                              batch_size=cfg.batch_size, vae=self.vae, progress=False)
            result = self.evaluator.evaluate(to_uint8(images))
            record = dict(step=global_step, epoch=epoch, fid=result["fid"], kid_mean=result["kid_mean"],
                          kid_std=result["kid_std"], fid_num_samples=len(images))
            _append_log(self.out / "train_log.jsonl", record)
            self.accelerator.log({"FID": result["fid"], "KID": result["kid_mean"]}, step=global_step)
            print(f"epoch {epoch + 1}: FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} ({len(images)} EMA samples)")
            if cfg.save_best_fid and result["fid"] < self.best:
                self.best = result["fid"]
                best = UNet2DModel.from_config(model.config)
                best.load_state_dict(model.state_dict())  # the EMA weights, copied in above
                trained = dict(trained_steps=global_step, trained_epochs=epoch + 1, fid=result["fid"])
                self.best_dir.mkdir(exist_ok=True)
                _save_pipeline_atomically(self.best_dir, lambda folder: save_pipeline(
                    folder, best, make_sampler("ddim", noise_config), {**cfg.to_dict(), **trained}, vae=self.vae))
                write_json(self.best_dir / "fid.json", dict(result, step=global_step, epoch=epoch))
            model.train()
            ema.restore(model.parameters())
        self.accelerator.wait_for_everyone()


def train(cfg: DDPMConfig) -> Path:
    out = check_output_dir(cfg)
    if (cfg.num_samples or 0) > GRID_MAX:  # every image of a training grid is held in memory
        raise UsageError(f"--num_samples {cfg.num_samples} is the size of the training sample grids; use at most {GRID_MAX} "
                         f"(sample_ddpm.py writes any number)")
    vae = load_training_vae(cfg)  # --latent: the frozen AutoencoderKL; an unreachable one fails in a second
    if cfg.size:  # --size the UNet cannot downsample fails now, not after loading the data
        unet_kwargs(cfg, 1, latent_format(cfg, vae, 1, cfg.size)[1] if vae else cfg.size)
    tracker = _setup_tracker(cfg)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu"),
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError("FSDP shards the UNet's parameters, but the every-step EMA and the saved pipeline need them whole; "
                         "use DDP (configs/accelerate/multi_node_gpu.yaml) or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)")
    if accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") \
            and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # accelerate 1.x runs `launch --cpu --num_processes N` as ONE process unless it is given an MPI hostfile.
        print("notice: accelerate started one CPU process; for several use "
              "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train_ddpm.py ...`", file=sys.stderr)
    if accelerator.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun started several processes, but without a GPU each one sees only itself unless
        # ACCELERATE_USE_CPU is set: every process would train the whole run alone, into the same folder.
        raise UsageError(f"{os.environ['WORLD_SIZE']} processes were launched but each one would train alone (no GPU, and "
                         f"ACCELERATE_USE_CPU is not set); for CPU processes launch with ACCELERATE_USE_CPU=1 "
                         f"(see configs/accelerate/multi_cpu.yaml)")

    data = (stream_images(cfg.dataset, cfg, accelerator.process_index, accelerator.num_processes) if cfg.streaming
            else load_images(cfg.dataset, "train", cfg, limit=cfg.max_train_samples, progress=main))
    if vae is not None:
        vae.to(accelerator.device)  # never prepared: no DDP wrapper, no optimiser, no checkpoint
    unet_channels, unet_size = latent_format(cfg, vae, data.channels, data.size) if vae else (data.channels, data.size)
    unet = build_unet(cfg, unet_channels, unet_size)
    fid_hook = _FidHook(cfg, out, accelerator, vae) if cfg.eval_fid_every else None
    prepare_output_dir(cfg, lock=main)  # only now: bad data or flags leave the disk as it was
    if main and cfg.overwrite_output_dir:  # start over: an earlier run's checkpoints and log would mix with this one's
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    # --push_to_hub: the repository is created now, so a bad token or no network fails before training.
    hub = TrainingPush(cfg, out) if cfg.push_to_hub and main else None
    accelerator.wait_for_everyone()
    accelerator.print(f"data: {cfg.dataset}, {'streamed' if cfg.streaming else len(data.images)} images of {data.channels}x{data.size}x{data.size}; "
                      f"UNet: {count_parameters(unet):,} parameters")
    if vae is not None:
        accelerator.print(f"latent: the UNet diffuses {unet_channels}x{unet_size}x{unet_size} latents of the VAE {cfg.vae} "
                          f"(latent_dist.{cfg.latent_mode} x {vae.config.scaling_factor}"
                          f"{', cached once' if cfg.cache_latents else ', encoded every batch'})")
    noise_scheduler = make_noise_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                           cfg.prediction_type, cfg.clip_sample)
    ema = make_ema(unet, cfg)
    optimizer = make_optimizer(unet.parameters(), cfg)
    if cfg.streaming:  # epochs are virtual: --max_train_steps in --n_epochs parts (warm-up, sample grids, FID)
        loader = StreamingBatches(data, cfg.batch_size, math.ceil(cfg.max_train_steps / cfg.n_epochs) * cfg.gradient_accumulation_steps,
                                  cfg.num_workers, accelerator.device)
    else:
        # --cache_latents: the loader serves the encoded dataset instead of the images.
        train_tensor = encode_dataset(vae, data.images, cfg.latent_mode, cfg.batch_size, progress=main) if cfg.cache_latents else data.images
        loader = batch_loader(train_tensor, cfg.batch_size, cfg.seed, cfg.num_workers)
    if cfg.compile:
        unet = torch.compile(unet)
    if cfg.streaming:  # each process already reads its own part (split_dataset_by_node): Accelerate must not shard it again
        unet, optimizer = accelerator.prepare(unet, optimizer)
    else:
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)

    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.n_epochs * steps_per_epoch
    # Stepped by hand once per optimiser update, so accumulation and process count
    # never change the schedule's length.
    lr_scheduler = make_lr_scheduler(optimizer.optimizer, cfg, max_steps, steps_per_epoch)

    # Saved with every checkpoint besides Accelerate's model/optimiser/RNG files: where the data
    # stands (epoch, batches of it consumed), the counters, the log's running loss, the LR schedule
    # and the EMA (weights as safetensors, the rest as JSON; nothing is unpickled on resume).
    state = dict(epoch=0, batches=0, skipped_nonfinite=0, loss_sum=0.0, loss_count=0)
    resumed = {}
    loss_sum = torch.zeros((), device=accelerator.device)
    model = accelerator.unwrap_model(unet, keep_torch_compile=False)
    param_names = [name for name, _ in model.named_parameters()]

    def write_trainer_state(folder: Path) -> None:
        save_file({n: p.detach().cpu().contiguous() for n, p in zip(param_names, ema.shadow_params)}, folder / EMA_FILE)
        ema_scalars = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        (folder / TRAINER_STATE).write_text(json.dumps(dict(
            progress=dict(state, loss_sum=loss_sum.item()), ema=ema_scalars, lr_scheduler=lr_scheduler.state_dict(), lr_total_steps=max_steps,
            model_config=_model_config(model)), indent=1))

    def read_trainer_state(folder: Path) -> None:
        saved = json.loads((folder / TRAINER_STATE).read_text())
        if saved["model_config"] != _model_config(model):
            differ = sorted(k for k in saved["model_config"] if saved["model_config"][k] != _model_config(model).get(k))
            raise UsageError(f"checkpoint {folder} is of a different model ({', '.join(differ)} differ); resume with the "
                             f"flags of the run that wrote it (see {out / 'train_config.json'})")
        shadow = load_file(str(folder / EMA_FILE))
        with torch.no_grad():
            for name, p in zip(param_names, ema.shadow_params):
                p.copy_(shadow[name])
        ema.load_state_dict(saved["ema"])
        schedule = saved["lr_scheduler"]
        resumed["total_steps"] = saved.get("lr_total_steps", schedule.get("total_steps", max_steps))
        if "total_steps" in schedule and schedule["total_steps"] != max_steps:
            # OneCycleLR keeps its length in its state: a longer or shorter run keeps the position, takes the new length
            # (get_scheduler's schedules take the new length from their re-made lambda).
            schedule = {**schedule, "total_steps": lr_scheduler.total_steps, "_schedule_phases": lr_scheduler._schedule_phases}
        lr_scheduler.load_state_dict(schedule)
        state.update(saved["progress"])
        loss_sum.fill_(state["loss_sum"])

    def checkpoint(step: int) -> Path:
        return save_checkpoint(accelerator, checkpoint_root, step, cfg.checkpoints_total_limit, write_trainer_state)

    checkpoint_root = out / "checkpoints"
    log_path = out / "train_log.jsonl"
    global_step = 0
    if cfg.resume_from_checkpoint:
        global_step = load_checkpoint(accelerator, cfg, checkpoint_root, read_trainer_state)
        if resumed.get("total_steps", max_steps) != max_steps and global_step < max_steps:
            lr_scheduler.last_epoch -= 1
            lr_scheduler.step()  # the learning rate of this step on the new schedule (the optimiser kept the old one)
            accelerator.print(f"notice: the run was planned for {resumed['total_steps']} steps and now has {max_steps}; "
                              f"the LR schedule continues from step {global_step} on the new length")
        if main and log_path.exists():
            _trim_log(log_path, global_step)
    if main:
        (out / "samples").mkdir(exist_ok=True)
        write_text(out / "train_config.json", json.dumps(public_config(cfg.to_dict()), indent=2), point="config")
    if tracker:
        flat = {k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in public_config(cfg.to_dict()).items()}
        accelerator.init_trackers("DDPM", config=flat, init_kwargs={"wandb": {"name": f"DDPM_{Path(cfg.dataset).name}"}})

    sampler = make_sampler(cfg.scheduler, noise_scheduler.config)
    steps = num_inference_steps(cfg.timesteps, cfg.sample_timesteps)
    images_per_update = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps

    def save_samples(epoch: int) -> None:
        if main:
            model = accelerator.unwrap_model(unet, keep_torch_compile=False)
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.eval()
            # The same noise every time, so grids compare across epochs.
            with accelerator.autocast():
                images = generate(model, sampler, cfg.num_samples or 16, steps, eta=cfg.ddpm, seed=cfg.seed,
                                  batch_size=cfg.batch_size, vae=vae, progress=False).float()  # a VAE decodes in bf16 under autocast
            model.train()
            ema.restore(model.parameters())
            grid = make_grid((images + 1) / 2, nrow=int(math.ceil(math.sqrt(len(images)))), padding=2)
            atomic_write(out / "samples" / f"epoch_{epoch + 1:04d}.png", lambda tmp: save_image(grid, tmp, format="PNG"),
                         f"the sample grid epoch_{epoch + 1:04d}.png", point="grid", advice=_RESUME_HINT)
            if tracker:
                _log_grid(accelerator, tracker, grid, global_step)
        accelerator.wait_for_everyone()

    def export_pipeline(folder: Path, step: int) -> None:
        """The EMA weights as a standard pipeline folder (the final output; --hub_strategy every_save)."""
        final = UNet2DModel.from_config(accelerator.unwrap_model(unet, keep_torch_compile=False).config)
        ema.copy_to(final.parameters())
        trained = dict(trained_steps=step, trained_epochs=math.ceil(step / steps_per_epoch),
                       mixed_precision_used=accelerator.mixed_precision)  # what ran: `auto` resolved, for the model card
        save_pipeline(folder, final, make_sampler("ddim", noise_scheduler.config), {**cfg.to_dict(), **trained}, vae=vae)

    # Resume exactly where the data stood (skipped non-finite batches consumed data but no step).
    first_epoch, skip_batches = state["epoch"], state["batches"]
    # Until max_steps, even past the planned epochs when non-finite batches were skipped; none for a finished run.
    epochs = itertools.count(first_epoch) if global_step < max_steps else ()
    progress = tqdm(total=max_steps, initial=global_step, desc="training", disable=not main, unit="step")
    last_log_time, last_log_step, last_saved = time.time(), global_step, global_step
    unet.train()
    with _StopRequest() as stop:
        for epoch in epochs:
            loader.set_epoch(epoch)
            if epoch == first_epoch and skip_batches:
                batches = loader.skip(skip_batches) if cfg.streaming else accelerator.skip_first_batches(loader, skip_batches)
            else:
                batches = loader
            for batch_index, (batch,) in enumerate(batches, start=skip_batches if epoch == first_epoch else 0):
                state.update(epoch=epoch, batches=batch_index + 1)
                with accelerator.accumulate(unet):
                    if cfg.random_flip:
                        batch = random_hflip(batch)
                    x0 = training_latents(vae, batch, cfg.latent_mode, cfg.cache_latents) if vae else to_model_range(batch)
                    loss = diffusion_loss(unet, noise_scheduler, x0, cfg, accelerator.autocast)
                    if os.environ.get("DDPM_HF_NAN_AT_STEP") == str(global_step + 1):
                        del os.environ["DDPM_HF_NAN_AT_STEP"]  # test hook (README, reliability): one non-finite loss
                        loss = loss * float("nan")
                    # One collective per batch: every process learns whether any loss is
                    # non-finite and whether any process was asked to stop.
                    flags = accelerator.gather(torch.stack([(~torch.isfinite(loss.detach())).float(),
                                                            torch.tensor(float(stop.requested), device=loss.device)])).view(-1, 2).amax(0)
                    if flags[0] > 0:
                        if not cfg.skip_nonfinite_steps:
                            kept = list_checkpoints(checkpoint_root)
                            where = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved yet"
                            progress.close()  # the error line starts a line of its own
                            raise DDPMError(f"the loss became non-finite at step {global_step + 1}; {where}; lower --lr, "
                                            f"use --mixed_precision no, or pass --skip_nonfinite_steps to skip such updates")
                        state["skipped_nonfinite"] += 1
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    accelerator.backward(loss)
                    if cfg.max_grad_norm and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                state["loss_count"] += 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                ema.step(unet.parameters())
                global_step += 1
                progress.update(1)

                if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                    mean_loss = accelerator.reduce(loss_sum / max(state["loss_count"], 1), "mean").item()
                    now = time.time()
                    record = dict(step=global_step, epoch=epoch, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0],
                                  images_per_sec=(global_step - last_log_step) * images_per_update / max(now - last_log_time, 1e-9),
                                  skipped_nonfinite=state["skipped_nonfinite"])
                    loss_sum.zero_()
                    state["loss_count"], last_log_time, last_log_step = 0, now, global_step
                    if main:
                        _append_log(log_path, record)
                        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
                    accelerator.log({"Train Loss": mean_loss, "Learning Rate": record["lr"], "images_per_sec": record["images_per_sec"]}, step=global_step)
                if global_step % cfg.checkpointing_steps == 0:
                    checkpoint(global_step)
                    last_saved = global_step
                    if hub and cfg.hub_strategy == "every_save":
                        hub.snapshot(global_step, lambda folder: export_pipeline(folder, global_step))
                if flags[1] > 0:
                    path = checkpoint_root / f"{CHECKPOINT_PREFIX}{global_step}" if last_saved == global_step else checkpoint(global_step)
                    progress.close()
                    accelerator.print(f"stopped at step {global_step}; checkpoint saved to {path}. Resume with the same "
                                      f"command plus --resume_from_checkpoint latest")
                    accelerator.end_training()
                    return out
                _test_kill("DDPM_HF_KILL_AT_STEP", global_step)
                if global_step >= max_steps:
                    break
            skip_batches = 0
            if epoch == 0 or (epoch + 1) % cfg.sample_and_save_freq == 0 or global_step >= max_steps:
                save_samples(epoch)
            if fid_hook and ((epoch + 1) % cfg.eval_fid_every == 0 or global_step >= max_steps):
                fid_hook(accelerator.unwrap_model(unet, keep_torch_compile=False), ema, sampler, steps, epoch, global_step,
                         noise_scheduler.config)
            if global_step >= max_steps:
                break
    progress.close()

    with _StopRequest(final=True) as late:  # a signal now lets the save finish (README, reliability)
        if os.environ.get("DDPM_HF_SIGTERM_AT_FINAL_SAVE") == "1":
            os.kill(os.getpid(), signal.SIGTERM)  # test hook: a SIGTERM that lands during the final save
        if not (checkpoint_root / f"{CHECKPOINT_PREFIX}{global_step}").exists():
            checkpoint(global_step)
        if main:
            _save_pipeline_atomically(out, lambda folder: export_pipeline(folder, global_step))
            print(f"saved the pipeline (EMA weights) to {out}; sample it with: python sample_ddpm.py --checkpoint {shlex.quote(str(out))}")
    if late.requested:
        accelerator.print(f"stopped at step {global_step}; checkpoint saved to {checkpoint_root / f'{CHECKPOINT_PREFIX}{global_step}'}. "
                          f"The run had finished: its pipeline is saved too")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if hub:
        hub.final()  # a failure leaves the saved output as it is: one line, non-zero exit (DDPMError)
    return out
