"""The Trainer: one training run of train_ddpm.py, everything through Accelerate.

AdamW + the original's one-cycle LR (or diffusers' schedules), the loss of training.py, an
every-step EMA of the parameters (never wrapped in DDP), sample grids from the EMA model,
resumable checkpoints (checkpoints.py), a JSON-lines log, and at the end a standard diffusers
pipeline folder holding the EMA weights.

    Trainer(cfg).run()  ==  setup() -> resume() -> train_epochs() -> finish()

One optimiser update is run_step() (forward, backward, update) then end_of_step() (LR, EMA,
log, checkpoint, stop); end_of_epoch() draws the sample grid and the FID evaluation.
"""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config.options import DDPMConfig
from ..data.cache import cached_images
from ..data.images import StreamingBatches, batch_loader, stream_images, to_model_range
from ..diffusion.latent import encode_dataset, latent_format, load_training_vae, training_latents
from ..diffusion.sampling import (
    GRID_MAX,
    generate,
    make_noise_scheduler,
    make_sampler,
    noise_scheduler_from_config,
    num_inference_steps,
    schedule_settings,
    terminal_snr_notice,
)
from ..hub.upload import TrainingPush
from ..models.pipeline import public_config, save_pipeline
from ..models.pretrained import check_data_format, describe, load_pretrained, unet_from_config
from ..models.unet import build_unet, count_parameters, unet_kwargs
from ..util import host_memory
from ..util.errors import DDPMError, UsageError
from ..util.files import make_subdir, write_text
from ..util.precision import resolve_mixed_precision, warn_if_bf16_emulated
from .checkpoints import CHECKPOINT_PREFIX, list_checkpoints, load_checkpoint, save_checkpoint
from .ema import ema_weights, make_ema
from .monitoring import FidHook, save_grid, setup_tracker
from .output import append_log, check_output_dir, prepare_output_dir, save_pipeline_atomically, trim_log
from .steps import diffusion_loss, draw_noise, make_lr_scheduler, make_optimizer, random_hflip

EMA_FILE = "ema.safetensors"
TRAINER_STATE = "trainer_state.json"  # data position, counters, EMA and LR-schedule state


@dataclasses.dataclass
class TrainerState:
    """Where a run stands: what a checkpoint restores besides Accelerate's model/optimiser/RNG files
    and the EMA (the step itself is the checkpoint's name)."""

    global_step: int = 0
    epoch: int = 0  # the epoch being read
    batches: int = 0  # batches of it consumed, skipped non-finite ones included (they consumed data)
    skipped_nonfinite: int = 0
    loss_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))  # since the last log line
    loss_count: int = 0

    def progress(self) -> dict:
        """The JSON of trainer_state.json's "progress" (without the step, which names the checkpoint)."""
        return dict(
            epoch=self.epoch,
            batches=self.batches,
            skipped_nonfinite=self.skipped_nonfinite,
            loss_sum=self.loss_sum.item(),
            loss_count=self.loss_count,
        )

    def restore(self, progress: dict) -> None:
        self.epoch, self.batches = progress["epoch"], progress["batches"]
        self.skipped_nonfinite, self.loss_count = progress["skipped_nonfinite"], progress["loss_count"]
        self.loss_sum.fill_(progress["loss_sum"])


class StopRequest:
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
        print(
            f"\n{signal.Signals(signum).name}: {what}"
            + (" (Ctrl-C again quits at once)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _model_config(model) -> dict:
    return {k: v for k, v in json.loads(json.dumps(dict(model.config), default=str)).items() if not k.startswith("_")}


def _check_launch(accelerator) -> None:
    """Launches that would not do what their user meant."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError(
            "FSDP shards the UNet's parameters, but the every-step EMA and the saved pipeline need them whole; "
            "use DDP (configs/accelerate/multi_node_gpu.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2.yaml)"
        )
    if (
        accelerator.num_processes == 1
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    ):
        # accelerate 1.x runs `launch --cpu --num_processes N` as ONE process unless it is given an MPI hostfile.
        print(
            "notice: accelerate started one CPU process; for several use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train_ddpm.py ...`",
            file=sys.stderr,
        )
    if accelerator.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun started several processes, but without a GPU each one sees only itself unless
        # ACCELERATE_USE_CPU is set: every process would train the whole run alone, into the same folder.
        raise UsageError(
            f"{os.environ['WORLD_SIZE']} processes were launched but each one would train alone (no GPU, and "
            f"ACCELERATE_USE_CPU is not set); for CPU processes launch with ACCELERATE_USE_CPU=1 "
            f"(see configs/accelerate/multi_cpu.yaml)"
        )


# On a CPU, pieces of 32 need under half the peak memory of one pass of 128 (2.1 vs 4.7 GB for the seed's
# model) at the same speed (benchmarks/results/train_fp32_batch128_processes.json). Before host_memory.py,
# they were also ~1.3x faster: one pass's activations (> 32 MiB each) were page-faulted in anew each step.
CPU_MICRO_BATCH = 32


def resolve_micro_batch(requested: Optional[int], batch_size: int, device: torch.device) -> int:
    """--micro_batch_size: 0 = the whole batch in one pass; auto (None) = 32 on a CPU, 0 elsewhere."""
    if requested is None:
        requested = CPU_MICRO_BATCH if device.type == "cpu" else 0
    return 0 if requested >= batch_size else requested


class Trainer:
    def __init__(self, cfg: DDPMConfig):
        self.cfg = cfg
        self.start = None  # set up by setup(): the pretrained model or UNet config the run starts from
        self.state = TrainerState()
        self.autocast = None  # Accelerate's, set in setup(); benchmarks/run.py may set another

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Check the flags, then the data, then create the output folder and the training parts: a
        run that fails on its flags or data leaves the disk as it was."""
        self.out = check_output_dir(self.cfg)
        self._check_flags()
        self.tracker, self.tracker_options = setup_tracker(self.cfg)
        self.accelerator = self._make_accelerator()
        self.main = self.accelerator.is_main_process
        self._load_data()
        self.fid_hook = (
            FidHook(self.cfg, self.out, self.accelerator, self.export_pipeline, self.vae)
            if self.cfg.eval_fid_every
            else None
        )
        prepare_output_dir(self.cfg, main=self.main)
        # --push_to_hub: the repository is created now, so a bad token or no network fails before training.
        self.hub = TrainingPush(self.cfg, self.out) if self.cfg.push_to_hub and self.main else None
        self.accelerator.wait_for_everyone()
        self.build(self.unet, self.train_data)
        if self.main:  # after the checks of flags and data: a bad input still gets one line
            warn_if_bf16_emulated(self.accelerator.mixed_precision, self.accelerator.device)
            notice = terminal_snr_notice(self.noise_scheduler.config)
            if notice:
                print(notice, file=sys.stderr)
        if host_memory.applied():  # set by the train command at its start (commands/common.py)
            self.accelerator.print(host_memory.applied())
        if self.micro_batch:
            how = (
                ""
                if self.cfg.micro_batch_size
                else f" (auto on a {self.accelerator.device.type.upper()}; --micro_batch_size 0: one pass)"
            )
            self.accelerator.print(
                f"micro-batches: each batch of {self.cfg.batch_size} in passes of {self.micro_batch} images{how}"
            )

    def _check_flags(self) -> None:
        cfg = self.cfg
        if cfg.micro_batch_size is not None and cfg.micro_batch_size < 0:
            raise UsageError(
                f"--micro_batch_size must be >= 0 (0: the whole batch in one pass), got {cfg.micro_batch_size}"
            )
        if (cfg.num_samples or 0) > GRID_MAX:  # every image of a training grid is held in memory
            raise UsageError(
                f"--num_samples {cfg.num_samples} is the size of the training sample grids; use at most {GRID_MAX} "
                f"(sample_ddpm.py writes any number)"
            )
        self.vae = load_training_vae(cfg)  # --latent: the frozen AutoencoderKL; an unreachable one fails in a second
        self.start = self._start_model()
        if cfg.size and self.start is None:  # --size the UNet cannot downsample fails now, not after loading the data
            unet_kwargs(cfg, 1, latent_format(cfg, self.vae, 1, cfg.size)[1] if self.vae else cfg.size)

    def _start_model(self):
        """--pretrained_model_name_or_path (its UNet and noise schedule; the run's records take its T, betas
        and prediction type) or --model_config_name_or_path (a new UNet of that config); None: the model flags."""
        cfg = self.cfg
        if cfg.pretrained_model_name_or_path:
            start = load_pretrained(cfg.pretrained_model_name_or_path)
            check_data_format(start, cfg.size, cfg.channels)
            self.cfg = dataclasses.replace(cfg, **schedule_settings(start.scheduler_config, cfg.sample_timesteps))
            return start
        if cfg.model_config_name_or_path:
            return unet_from_config(cfg.model_config_name_or_path, cfg.size, cfg.channels)
        return None

    def _make_accelerator(self) -> Accelerator:
        cfg = self.cfg
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=resolve_mixed_precision(
                cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu"
            ),
            log_with=self.tracker,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        set_seed(cfg.seed)
        _check_launch(accelerator)
        self.autocast = accelerator.autocast
        return accelerator

    def _load_data(self) -> None:
        """The images (or a stream of them), and the UNet sized for them (or for their latents)."""
        cfg, accelerator, start = self.cfg, self.accelerator, self.start
        size, channels = (start.size, start.channels) if start else (None, None)  # a start model sets the format
        data = (
            stream_images(cfg.dataset, cfg, accelerator.process_index, accelerator.num_processes, size, channels)
            if cfg.streaming
            else cached_images(cfg.dataset, "train", cfg, size, channels, cfg.max_train_samples, self.main)
        )
        vae = self.vae
        if vae is not None:
            vae.to(accelerator.device)  # never prepared: no DDP wrapper, no optimiser, no checkpoint
        channels, size = latent_format(cfg, vae, data.channels, data.size) if vae else (data.channels, data.size)
        self.unet = start.unet if start else build_unet(cfg, channels, size)
        self._check_batch_fits(size, getattr(data, "decided_by", ""))
        if start:
            accelerator.print(describe(start))
        accelerator.print(
            f"data: {cfg.dataset}, {'streamed' if cfg.streaming else len(data.images)} images of "
            f"{data.channels}x{data.size}x{data.size}; UNet: {count_parameters(self.unet):,} parameters"
        )
        if vae is not None:
            accelerator.print(
                f"latent: the UNet diffuses {channels}x{size}x{size} latents of the VAE {cfg.vae} "
                f"(latent_dist.{cfg.latent_mode} x {vae.config.scaling_factor}"
                f"{', cached once' if cfg.cache_latents else ', encoded every batch'})"
            )
        if cfg.streaming:
            self.train_data = data
        else:  # --cache_latents: the loader serves the encoded dataset instead of the images.
            self.train_data = (
                encode_dataset(vae, data.images, cfg.latent_mode, cfg.batch_size, progress=self.main)
                if cfg.cache_latents
                else data.images
            )

    def _check_batch_fits(self, size: int, decided_by: str) -> None:
        """A training batch (activations kept for the backward pass; weights, gradients and Adam's two
        moments) fits on the device, before the first step allocates it."""
        from ..util.memory import refuse_if_too_big, unet_batch_bytes

        batch = self.cfg.batch_size
        need = unet_batch_bytes(self.unet.config, batch, size, training=True) + 16 * count_parameters(self.unet)
        refuse_if_too_big(
            need,
            self.accelerator.device,
            f"training a batch of {batch} at {size}x{size}",
            f"lower --batch_size, or {decided_by}" if decided_by else "lower --batch_size or --size",
        )

    @classmethod
    def for_step(cls, cfg: DDPMConfig, unet, images: torch.Tensor, accelerator: Accelerator) -> "Trainer":
        """A Trainer with its training parts only (no run folder, tracker or data set): run_step() and
        after_update() as a run makes them, on `images` (what benchmarks/run.py times)."""
        trainer = cls(cfg)
        trainer.accelerator, trainer.main, trainer.vae = accelerator, accelerator.is_main_process, None
        trainer.autocast = accelerator.autocast
        trainer.build(unet, images)
        return trainer

    def build(self, unet, data) -> None:
        """The noise process, EMA, optimiser, loader and LR schedule for `unet` on `data` (a uint8
        image or latent tensor, or a stream under --streaming), prepared by Accelerate."""
        cfg, accelerator = self.cfg, self.accelerator
        start = getattr(self, "start", None)
        self.noise_scheduler = (
            noise_scheduler_from_config(start.scheduler_config)
            if start is not None and start.scheduler_config is not None
            else make_noise_scheduler(
                cfg.timesteps,
                cfg.beta_start,
                cfg.beta_end,
                cfg.beta_schedule,
                cfg.prediction_type,
                cfg.clip_sample,
                rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
                timestep_spacing=cfg.timestep_spacing,
            )
        )
        self.ema = make_ema(unet, cfg.ema_rate, cfg.ema_warmup, cfg.ema_inv_gamma, cfg.ema_power)
        optimizer = make_optimizer(
            unet.parameters(), cfg.lr, cfg.decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon
        )
        if cfg.streaming:  # epochs are virtual: --max_train_steps in --n_epochs parts (warm-up, sample grids, FID)
            self.loader = StreamingBatches(
                data,
                cfg.batch_size,
                math.ceil(cfg.max_train_steps / cfg.n_epochs) * cfg.gradient_accumulation_steps,
                cfg.num_workers,
                accelerator.device,
            )
        else:
            self.loader = batch_loader(data, cfg.batch_size, cfg.seed, cfg.num_workers)
        if cfg.compile:
            unet = torch.compile(unet)
        if (
            cfg.streaming
        ):  # each process already reads its own part (split_dataset_by_node): Accelerate must not shard it again
            self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        else:
            self.unet, self.optimizer, self.loader = accelerator.prepare(unet, optimizer, self.loader)
        self.ema.to(accelerator.device)
        self.model = accelerator.unwrap_model(self.unet, keep_torch_compile=False)
        self.steps_per_epoch = math.ceil(len(self.loader) / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.n_epochs * self.steps_per_epoch
        # Stepped by hand once per optimiser update, so accumulation and process count never change its length.
        self.lr_scheduler = make_lr_scheduler(
            self.optimizer.optimizer, cfg.lr_scheduler, cfg.lr, self.max_steps, cfg.lr_warmup(self.steps_per_epoch)
        )
        self.state.loss_sum = torch.zeros((), device=accelerator.device)
        self.micro_batch = resolve_micro_batch(cfg.micro_batch_size, cfg.batch_size, accelerator.device)
        self.sampler = make_sampler(cfg.scheduler, self.noise_scheduler.config)
        self.sample_steps = num_inference_steps(cfg.timesteps, cfg.sample_timesteps)

    # ---- checkpoints ----------------------------------------------------------------------
    def write_trainer_state(self, folder: Path) -> None:
        """Besides Accelerate's files: the EMA (weights as safetensors, the rest as JSON: nothing is
        unpickled on resume), the data position and counters, the LR schedule."""
        names = [name for name, _ in self.model.named_parameters()]
        save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, self.ema.shadow_params)}, folder / EMA_FILE)
        ema_scalars = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        (folder / TRAINER_STATE).write_text(
            json.dumps(
                dict(
                    progress=self.state.progress(),
                    ema=ema_scalars,
                    lr_scheduler=self.lr_scheduler.state_dict(),
                    lr_total_steps=self.max_steps,
                    model_config=_model_config(self.model),
                ),
                indent=1,
            )
        )

    def read_trainer_state(self, folder: Path) -> None:
        saved = json.loads((folder / TRAINER_STATE).read_text())
        if saved["model_config"] != _model_config(self.model):
            differ = sorted(
                k for k in saved["model_config"] if saved["model_config"][k] != _model_config(self.model).get(k)
            )
            raise UsageError(
                f"checkpoint {folder} is of a different model ({', '.join(differ)} differ); resume with the "
                f"flags of the run that wrote it (see {self.out / 'train_config.json'})"
            )
        shadow = load_file(str(folder / EMA_FILE))
        with torch.no_grad():
            for (name, _), p in zip(self.model.named_parameters(), self.ema.shadow_params):
                p.copy_(shadow[name])
        self.ema.load_state_dict(saved["ema"])
        self.planned_steps = saved.get("lr_total_steps", saved["lr_scheduler"].get("total_steps", self.max_steps))
        self._restore_lr_schedule(saved["lr_scheduler"])
        self.state.restore(saved["progress"])

    def _restore_lr_schedule(self, schedule: dict) -> None:
        if "total_steps" in schedule and schedule["total_steps"] != self.max_steps:
            # OneCycleLR keeps its length in its state: a longer or shorter run keeps the position, takes the new length
            # (get_scheduler's schedules take the new length from their re-made lambda).
            schedule = {
                **schedule,
                "total_steps": self.lr_scheduler.total_steps,
                "_schedule_phases": self.lr_scheduler._schedule_phases,
            }
        self.lr_scheduler.load_state_dict(schedule)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(
            self.accelerator,
            self.out / "checkpoints",
            self.state.global_step,
            self.cfg.checkpoints_total_limit,
            self.write_trainer_state,
        )

    def resume(self) -> None:
        """--resume_from_checkpoint: the checkpoint's weights, optimiser, RNG, EMA, data position and
        schedule; the log loses the lines of steps after it (they are trained again)."""
        cfg = self.cfg
        if cfg.resume_from_checkpoint:
            self.planned_steps = self.max_steps
            step = load_checkpoint(
                self.accelerator, self.out / "checkpoints", cfg.resume_from_checkpoint, self.read_trainer_state
            )
            self.state.global_step = step
            if self.planned_steps != self.max_steps and step < self.max_steps:
                self.lr_scheduler.last_epoch -= 1
                # the learning rate of this step on the new schedule (the optimiser kept the old one)
                self.lr_scheduler.step()
                self.accelerator.print(
                    f"notice: the run was planned for {self.planned_steps} steps and now has {self.max_steps}; "
                    f"the LR schedule continues from step {step} on the new length"
                )
            if self.main and (self.out / "train_log.jsonl").exists():
                trim_log(self.out / "train_log.jsonl", step)
        if self.main:
            make_subdir(self.out, "samples")  # a link there is refused: the grids would land where it points
            write_text(self.out / "train_config.json", json.dumps(public_config(cfg.to_dict()), indent=2))
        if self.tracker:
            flat = {
                k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in public_config(cfg.to_dict()).items()
            }
            self.accelerator.init_trackers(
                "DDPM",
                config=flat,
                init_kwargs={"wandb": {"name": f"DDPM_{Path(cfg.dataset).name}", **self.tracker_options}},
            )

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> Path:
        self.setup()
        self.resume()
        with StopRequest() as stop:
            stopped = self.train_epochs(stop)
        if not stopped:
            self.finish()
        return self.out

    def train_epochs(self, stop: StopRequest) -> bool:
        """Epochs until --max_train_steps (past the planned epochs when non-finite batches were skipped;
        none for a finished run). True when a signal stopped the run."""
        state = self.state
        self.progress = tqdm(
            total=self.max_steps, initial=state.global_step, desc="training", disable=not self.main, unit="step"
        )
        self.last_log = (time.time(), state.global_step)
        self.last_saved = state.global_step
        self.unet.train()
        for epoch in itertools.count(state.epoch) if state.global_step < self.max_steps else ():
            for batch in self.epoch_batches(epoch):
                if self.run_step(batch, stop) and self.end_of_step(stop):
                    return True
                if state.global_step >= self.max_steps:
                    break
            self.end_of_epoch(epoch)
            if state.global_step >= self.max_steps:
                break
        self.progress.close()
        return False

    def epoch_batches(self, epoch: int):
        """The epoch's batches, from where the data stood on resume (batches already consumed are skipped)."""
        self.loader.set_epoch(epoch)
        skip = self.state.batches if epoch == self.state.epoch else 0
        batches = self.loader
        if skip:
            batches = (
                self.loader.skip(skip) if self.cfg.streaming else self.accelerator.skip_first_batches(self.loader, skip)
            )
        for index, (batch,) in enumerate(batches, start=skip):
            self.state.epoch, self.state.batches = epoch, index + 1
            yield batch

    def run_step(self, batch: torch.Tensor, stop=None) -> bool:
        """Forward and backward of one batch, and the optimiser update at the end of an accumulation.
        True when an update was made; a non-finite loss skips it (--skip_nonfinite_steps) or stops."""
        with self.accelerator.accumulate(self.unet):
            loss = self.forward_backward(self.model_input(batch))
            self.flags = self._collective_flags(loss, stop)
            if self.flags[0] > 0:
                return self._skip_nonfinite()  # its gradients are dropped unused
            self.update()
        self.state.loss_sum += loss.detach()
        self.state.loss_count += 1
        return self.accelerator.sync_gradients

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the UNet diffuses: pixels in [-1, 1], or the VAE's latents."""
        if self.cfg.random_flip:
            batch = random_hflip(batch)
        return (
            training_latents(self.vae, batch, self.cfg.latent_mode, self.cfg.cache_latents)
            if self.vae
            else to_model_range(batch)
        )

    def forward_backward(self, x0: torch.Tensor) -> torch.Tensor:
        """The batch's loss and its gradients, in pieces of `micro_batch` images: noise and timesteps
        are drawn for the whole batch, each piece's loss is weighted by its share of the batch, so the
        loss and gradient are the batch's (GroupNorm has no batch statistics); only one piece's
        activations are held at a time (CPU_MICRO_BATCH)."""
        noise, t = draw_noise(self.noise_scheduler, x0)
        size = self.micro_batch or len(x0)
        pieces = list(zip(x0.split(size), noise.split(size), t.split(size)))
        total = torch.zeros((), device=x0.device)
        for i, (x, n, steps) in enumerate(pieces):
            last = i == len(pieces) - 1  # DDP all-reduces the gradients once, after the last piece
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.unet):
                loss = diffusion_loss(
                    self.unet, self.noise_scheduler, x, self.cfg.loss_type, self.cfg.snr_gamma, self.autocast, n, steps
                ) * (len(x) / len(x0))
                self.accelerator.backward(loss)
            total += loss.detach()
        return total

    def update(self) -> None:
        if self.cfg.max_grad_norm and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.unet.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _collective_flags(self, loss: torch.Tensor, stop) -> torch.Tensor:
        """One collective per batch: every process learns whether any loss is non-finite and whether
        any process was asked to stop."""
        local = torch.stack(
            [
                (~torch.isfinite(loss.detach())).float(),
                torch.tensor(float(bool(stop and stop.requested)), device=loss.device),
            ]
        )
        return self.accelerator.gather(local).view(-1, 2).amax(0)

    def _skip_nonfinite(self) -> bool:
        if not self.cfg.skip_nonfinite_steps:
            kept = list_checkpoints(self.out / "checkpoints")
            where = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved yet"
            self.progress.close()  # the error line starts a line of its own
            raise DDPMError(
                f"the loss became non-finite at step {self.state.global_step + 1}; {where}; lower --lr, "
                f"use --mixed_precision no, or pass --skip_nonfinite_steps to skip such updates"
            )
        self.state.skipped_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        return False

    def end_of_step(self, stop: StopRequest) -> bool:
        """After an optimiser update: LR, EMA, log, checkpoint. True when a signal stops the run here."""
        self.after_update()
        step = self.state.global_step
        self.progress.update(1)
        if step % self.cfg.logging_steps == 0 or step == self.max_steps:
            self.log_step()
        if step % self.cfg.checkpointing_steps == 0:
            self.save_checkpoint()
            self.last_saved = step
            if self.hub and self.cfg.hub_strategy == "every_save":
                self.hub.snapshot(step, lambda folder: self.export_pipeline(folder, step))
        if self.flags[1] > 0:
            self.stop_now()
            return True
        return False

    def after_update(self) -> None:
        """What every optimiser update moves: the LR schedule, the EMA, the step counter."""
        self.lr_scheduler.step()
        self.ema.step(self.unet.parameters())
        self.state.global_step += 1

    def log_step(self) -> None:
        """The mean loss since the last line, the LR and the throughput: train_log.jsonl, the tracker, the bar."""
        state, accelerator = self.state, self.accelerator
        mean_loss = accelerator.reduce(state.loss_sum / max(state.loss_count, 1), "mean").item()
        now, (last_time, last_step) = time.time(), self.last_log
        images_per_update = self.cfg.batch_size * accelerator.num_processes * self.cfg.gradient_accumulation_steps
        record = dict(
            step=state.global_step,
            epoch=state.epoch,
            loss=mean_loss,
            lr=self.lr_scheduler.get_last_lr()[0],
            images_per_sec=(state.global_step - last_step) * images_per_update / max(now - last_time, 1e-9),
            skipped_nonfinite=state.skipped_nonfinite,
        )
        state.loss_sum.zero_()
        state.loss_count, self.last_log = 0, (now, state.global_step)
        if self.main:
            append_log(self.out / "train_log.jsonl", record)
            self.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
        accelerator.log(
            {"Train Loss": mean_loss, "Learning Rate": record["lr"], "images_per_sec": record["images_per_sec"]},
            step=state.global_step,
        )

    def stop_now(self) -> None:
        step = self.state.global_step
        path = (
            self.out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
            if self.last_saved == step
            else self.save_checkpoint()
        )
        self.progress.close()
        self.accelerator.print(
            f"stopped at step {step}; checkpoint saved to {path}. Resume with the same "
            f"command plus --resume_from_checkpoint latest"
        )
        self.accelerator.end_training()

    def end_of_epoch(self, epoch: int) -> None:
        """The EMA sample grid (first epoch, every --sample_and_save_freq, last) and --eval_fid_every."""
        last = self.state.global_step >= self.max_steps
        if epoch == 0 or (epoch + 1) % self.cfg.sample_and_save_freq == 0 or last:
            self.save_samples(epoch)
        if self.fid_hook and ((epoch + 1) % self.cfg.eval_fid_every == 0 or last):
            self.fid_hook(self.model, self.ema, self.sampler, self.sample_steps, epoch, self.state.global_step)

    def save_samples(self, epoch: int) -> None:
        if self.main:
            with ema_weights(self.ema, self.model), self.accelerator.autocast():
                # The same noise every time, so grids compare across epochs.
                images = generate(
                    self.model,
                    self.sampler,
                    self.cfg.num_samples or 16,
                    self.sample_steps,
                    eta=self.cfg.ddpm,
                    seed=self.cfg.seed,
                    batch_size=self.cfg.batch_size,
                    vae=self.vae,
                    progress=False,
                )
            save_grid(
                images.float(),
                self.out / "samples" / f"epoch_{epoch + 1:04d}.png",  # a VAE decodes in bf16 under autocast
                self.accelerator,
                self.tracker,
                self.state.global_step,
            )
        self.accelerator.wait_for_everyone()

    # ---- the end --------------------------------------------------------------------------
    def export_pipeline(self, folder: Path, step: int, **record) -> None:
        """The EMA weights as a standard pipeline folder (the final output, best_fid/, --hub_strategy every_save)."""
        final = UNet2DModel.from_config(self.model.config)
        self.ema.copy_to(final.parameters())
        trained = dict(
            trained_steps=step,
            trained_epochs=math.ceil(step / self.steps_per_epoch),
            mixed_precision_used=self.accelerator.mixed_precision,
            **record,
        )  # what ran: `auto` resolved
        save_pipeline(
            folder,
            final,
            make_sampler("ddim", self.noise_scheduler.config),
            {**self.cfg.to_dict(), **trained},
            vae=self.vae,
        )

    def finish(self) -> None:
        """The last checkpoint and the pipeline (a signal now lets the save finish), then the Hub push."""
        step, checkpoint_root = self.state.global_step, self.out / "checkpoints"
        with StopRequest(final=True) as late:
            if not (checkpoint_root / f"{CHECKPOINT_PREFIX}{step}").exists():
                self.save_checkpoint()
            if self.main:
                save_pipeline_atomically(self.out, lambda folder: self.export_pipeline(folder, step))
                print(
                    f"saved the pipeline (EMA weights) to {self.out}; sample it with: python sample_ddpm.py "
                    "--checkpoint "
                    f"{shlex.quote(str(self.out))}"
                )
        if late.requested:
            self.accelerator.print(
                f"stopped at step {step}; checkpoint saved to {checkpoint_root / f'{CHECKPOINT_PREFIX}{step}'}. "
                f"The run had finished: its pipeline is saved too"
            )
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.hub:
            self.hub.final()  # a failure leaves the saved output as it is: one line, non-zero exit (DDPMError)


def train(cfg: DDPMConfig) -> Path:
    """Train as train_ddpm.py does; returns the output folder (a diffusers pipeline)."""
    return Trainer(cfg).run()
