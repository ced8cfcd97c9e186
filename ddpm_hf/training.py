"""The training loop: one loop, everything through Accelerate.

AdamW + the original's one-cycle LR (warm-up in epochs), huber/l2/l1 loss on the
predicted noise, an every-step EMA of the parameters (never wrapped in DDP), sample
grids from the EMA model, resumable checkpoints written atomically, a JSON-lines log,
and at the end a standard diffusers pipeline folder holding the EMA weights.
"""

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from .config import DDPMConfig
from .data import load_images, to_model_range
from .errors import DDPMError, UsageError
from .losses import elementwise_loss
from .model import build_unet, count_parameters
from .pipeline import public_config, save_pipeline
from .sampling import generate, make_noise_scheduler, make_sampler, num_inference_steps

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"


class PlainEMA(EMAModel):
    """diffusers' EMAModel with the original's rule: the same decay from the first update
    (the stock class uses decay 0, a plain copy, on its first step)."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


def prepare_output_dir(cfg: DDPMConfig) -> Path:
    out = Path(cfg.resolved_output_dir())
    if (out / "model_index.json").exists() and not (cfg.overwrite_output_dir or cfg.resume_from_checkpoint):
        raise UsageError(f"{out} already holds a trained pipeline; pass --overwrite_output_dir to replace it, "
                         f"--resume_from_checkpoint latest to continue, or another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"output folder {out} is not writable ({err.strerror}); choose another --output_dir") from None
    return out


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(checkpoint_root: Path) -> list:
    """Complete checkpoints, oldest first (partial ones carry a suffix and are ignored)."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=_checkpoint_step)


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, limit=None) -> Path:
    """save_state into `checkpoint-N.partial`, then rename: a kill mid-save never leaves a
    checkpoint that `latest` would pick."""
    final = checkpoint_root / f"{CHECKPOINT_PREFIX}{step}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if limit:
            for old in list_checkpoints(checkpoint_root)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, cfg: DDPMConfig, checkpoint_root: Path) -> int:
    """Restore the requested checkpoint; return the optimiser step it was saved at.
    With 'latest', a damaged checkpoint is reported and the next older one is tried."""
    if cfg.resume_from_checkpoint == "latest":
        candidates = list_checkpoints(checkpoint_root)[::-1]
        if not candidates:
            accelerator.print(f"no checkpoint in {checkpoint_root}; starting a new run")
            return 0
    else:
        path = Path(cfg.resume_from_checkpoint)
        if not path.is_dir() or not path.name.startswith(CHECKPOINT_PREFIX):
            raise UsageError(f"--resume_from_checkpoint {path} is not a checkpoint folder (checkpoints/checkpoint-N) or 'latest'")
        candidates = [path]
    for path in candidates:
        try:
            accelerator.load_state(str(path))
        except Exception as err:
            message = f"checkpoint {path} is damaged or incomplete ({type(err).__name__})"
            if cfg.resume_from_checkpoint != "latest":
                raise DDPMError(f"{message}; resume from another checkpoint or 'latest'") from None
            print(f"warning: {message}; trying an older one", file=sys.stderr)
            continue
        accelerator.print(f"resumed from {path}")
        return _checkpoint_step(path)
    raise DDPMError(f"no loadable checkpoint in {checkpoint_root}; remove the damaged ones or start without --resume_from_checkpoint")


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


def _one_cycle(optimizer, cfg: DDPMConfig, total_steps: int, steps_per_epoch: int):
    """The original's OneCycleLR: from 1e-6 up to lr over --warmup epochs, cosine back to 1e-6."""
    pct_start = min(cfg.warmup * steps_per_epoch / total_steps, (total_steps - 1) / total_steps) if total_steps > 1 else 0.0
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy="cos",
        cycle_momentum=False, div_factor=cfg.lr / 1e-6, final_div_factor=1)


class _StopRequest:
    """SIGINT/SIGTERM finish the current step, save a checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: DDPMConfig) -> Path:
    out = prepare_output_dir(cfg)
    tracker = _setup_tracker(cfg)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed)
    main = accelerator.is_main_process

    data = load_images(cfg.dataset, "train", cfg, limit=cfg.max_train_samples, progress=main)
    unet = build_unet(cfg, data.channels, data.size)
    accelerator.print(f"data: {cfg.dataset}, {len(data.images)} images of {data.channels}x{data.size}x{data.size}; "
                      f"UNet: {count_parameters(unet):,} parameters")
    noise_scheduler = make_noise_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    ema = PlainEMA(unet.parameters(), decay=cfg.ema_rate, min_decay=cfg.ema_rate, use_ema_warmup=False,
                   foreach=True, model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.decay, foreach=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images), batch_size=cfg.batch_size,
                                         shuffle=True, num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.compile:
        unet = torch.compile(unet)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)

    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.n_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    # Stepped by hand once per optimiser update, so accumulation and process count
    # never change the schedule's length.
    lr_scheduler = _one_cycle(optimizer.optimizer, cfg, max_steps, steps_per_epoch)
    accelerator.register_for_checkpointing(lr_scheduler, ema)

    checkpoint_root = out / "checkpoints"
    global_step = load_checkpoint(accelerator, cfg, checkpoint_root) if cfg.resume_from_checkpoint else 0
    if main:
        (out / "samples").mkdir(exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(public_config(cfg.to_dict()), indent=2))
    if tracker:
        flat = {k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in public_config(cfg.to_dict()).items()}
        accelerator.init_trackers("DDPM", config=flat, init_kwargs={"wandb": {"name": f"DDPM_{Path(cfg.dataset).name}"}})

    sampler = make_sampler(cfg.scheduler, noise_scheduler.config)
    steps = num_inference_steps(cfg.timesteps, cfg.sample_timesteps)
    images_per_update = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    log_path = out / "train_log.jsonl"

    def save_samples(epoch: int) -> None:
        if main:
            model = accelerator.unwrap_model(unet, keep_torch_compile=False)
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.eval()
            # The same noise every time, so grids compare across epochs.
            images = generate(model, sampler, cfg.num_samples or 16, steps, eta=cfg.ddpm, seed=cfg.seed,
                              batch_size=cfg.batch_size, progress=False)
            model.train()
            ema.restore(model.parameters())
            grid = make_grid((images + 1) / 2, nrow=int(math.ceil(math.sqrt(len(images)))), padding=2)
            save_image(grid, out / "samples" / f"epoch_{epoch + 1:04d}.png")
            if tracker:
                _log_grid(accelerator, tracker, grid, global_step)
        accelerator.wait_for_everyone()

    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
    progress = tqdm(total=max_steps, initial=global_step, desc="training", disable=not main, unit="step")
    loss_sum, loss_count, skipped_steps = torch.zeros((), device=accelerator.device), 0, 0
    last_log_time, last_log_step = time.time(), global_step
    unet.train()
    with _StopRequest() as stop:
        for epoch in range(first_epoch, num_epochs):
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip_batches) if epoch == first_epoch and skip_batches else loader
            for (batch,) in batches:
                with accelerator.accumulate(unet):
                    x0 = to_model_range(batch)
                    noise = torch.randn_like(x0)
                    t = torch.randint(0, cfg.timesteps, (x0.shape[0],), device=x0.device)
                    with accelerator.autocast():
                        pred = unet(noise_scheduler.add_noise(x0, noise, t), t).sample
                    loss = elementwise_loss(pred.float(), noise, cfg.loss_type).mean()
                    # One collective per batch: every process learns whether any loss is
                    # non-finite and whether any process was asked to stop.
                    flags = accelerator.gather(torch.stack([(~torch.isfinite(loss.detach())).float(),
                                                            torch.tensor(float(stop.requested), device=loss.device)])).view(-1, 2).amax(0)
                    if flags[0] > 0:
                        if not cfg.skip_nonfinite_steps:
                            raise DDPMError(f"the loss became non-finite at step {global_step + 1}; the last good checkpoint "
                                            f"is kept in {checkpoint_root}; lower --lr, use --mixed_precision no, or pass --skip_nonfinite_steps")
                        skipped_steps += 1
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                ema.step(unet.parameters())
                global_step += 1
                progress.update(1)

                if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                    mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), "mean").item()
                    now = time.time()
                    record = dict(step=global_step, epoch=epoch, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0],
                                  images_per_sec=(global_step - last_log_step) * images_per_update / max(now - last_log_time, 1e-9),
                                  skipped_nonfinite=skipped_steps)
                    loss_sum.zero_()
                    loss_count, last_log_time, last_log_step = 0, now, global_step
                    if main:
                        with log_path.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
                    accelerator.log({"Train Loss": mean_loss, "Learning Rate": record["lr"], "images_per_sec": record["images_per_sec"]}, step=global_step)
                if global_step % cfg.checkpointing_steps == 0:
                    save_checkpoint(accelerator, checkpoint_root, global_step, cfg.checkpoints_total_limit)
                if flags[1] > 0:
                    path = save_checkpoint(accelerator, checkpoint_root, global_step, cfg.checkpoints_total_limit)
                    accelerator.print(f"stopped at step {global_step}; checkpoint saved to {path}. Resume with the same "
                                      f"command plus --resume_from_checkpoint latest")
                    accelerator.end_training()
                    return out
                if global_step >= max_steps:
                    break
            skip_batches = 0
            if epoch == 0 or (epoch + 1) % cfg.sample_and_save_freq == 0 or global_step >= max_steps:
                save_samples(epoch)
            if global_step >= max_steps:
                break
    progress.close()

    if not (checkpoint_root / f"{CHECKPOINT_PREFIX}{global_step}").exists():
        save_checkpoint(accelerator, checkpoint_root, global_step, cfg.checkpoints_total_limit)
    if main:
        final = UNet2DModel.from_config(accelerator.unwrap_model(unet, keep_torch_compile=False).config)
        ema.copy_to(final.parameters())
        trained = dict(trained_steps=global_step, trained_epochs=math.ceil(global_step / steps_per_epoch))
        save_pipeline(out, final, make_sampler("ddim", noise_scheduler.config), {**cfg.to_dict(), **trained})
        print(f"saved the pipeline (EMA weights) to {out}; sample it with: python sample_ddpm.py --checkpoint {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
