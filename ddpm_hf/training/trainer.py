"""The Trainer: one training run of train_ddpm.py, everything through Accelerate.

AdamW + the original's one-cycle LR (or diffusers' schedules), the loss of training.py, an
every-step EMA of the parameters (never wrapped in DDP), sample grids from the EMA model,
resumable checkpoints (checkpoints.py), a JSON-lines log, and at the end a standard diffusers
pipeline folder holding the EMA weights.

    Trainer(data=..., model=..., ..., hub=...).run()  ==  setup() -> resume() -> train_epochs() -> finish()

The Trainer takes the settings sections it uses (config/sections.py), never the whole configuration:
`ddpm_hf.train(cfg)` (commands/train.py) checks a DDPMConfig and hands them over.

The Trainer holds the training parts (parts.py: UNet, optimiser, LR schedule, EMA, loader, ...)
and the run's state (checkpoints.TrainerState). One optimiser update is run_step() (train_step.py:
forward, backward, update) then end_of_step() (LR, EMA, log, checkpoint, stop); end_of_epoch()
draws the sample grid and the FID evaluation.
"""

import functools
import itertools
import shlex
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..config.sections import (
    DataSettings,
    DiffusionSettings,
    FIDSettings,
    HubSettings,
    LatentSettings,
    ModelSettings,
    OutputSettings,
    SamplingSettings,
    TrainingSettings,
    flags_of,
)
from ..diffusion.sampling import GRID_MAX, generate, schedule_settings, terminal_snr_notice
from ..hub.upload import TrainingPush
from ..models.pipeline import public_config
from ..models.pretrained import check_data_format, load_pretrained, unet_from_config
from ..models.unet import unet_kwargs
from ..util import host_memory
from ..util.errors import DDPMError, UsageError
from ..util.files import make_subdir, write_json
from ..util.logs import get_logger
from ..util.precision import warn_if_bf16_emulated
from .checkpoints import CHECKPOINT_PREFIX, TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from .ema import ema_weights
from .launch import make_accelerator
from .monitoring import FidHook, init_tracker, save_grid, setup_tracker
from .output import (
    TRACKER_PROJECT,
    append_log,
    check_output_dir,
    export_pipeline,
    prepare_output_dir,
    save_pipeline_atomically,
    trim_log,
)
from .parts import PART_SECTIONS, build_parts, load_training_data
from .train_step import after_update, model_input, train_step

logger = get_logger(__name__)


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
        # print, not the logger: a signal can arrive while a log handler holds its lock mid-line, and the user
        # who pressed Ctrl-C is answered whatever --log_level says, like an error line.
        print(
            f"\n{signal.Signals(signum).name}: {what}"
            + (" (Ctrl-C again quits at once)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# The sections of the settings a run reads (Sections' field names): `Trainer(**sections.pick(*TRAINER_SECTIONS))`.
TRAINER_SECTIONS = ("data", "model", "diffusion", "latent", "training", "output", "sampling", "fid", "hub")


class Trainer:
    def __init__(
        self,
        *,
        data: DataSettings,
        model: ModelSettings,
        diffusion: DiffusionSettings,
        latent: LatentSettings,
        training: TrainingSettings,
        output: OutputSettings,
        sampling: SamplingSettings,
        fid: FIDSettings,
        hub: HubSettings,
        settings: Optional[dict] = None,
    ):
        self.data, self.model, self.diffusion, self.latent = data, model, diffusion, latent
        self.training, self.output, self.sampling, self.fid, self.hub = training, output, sampling, fid, hub
        # The flags' values by flag name (default: these sections'): train_config.json, the pipeline's record,
        # the resume check.
        sections = (data, model, diffusion, latent, training, output, sampling, fid, hub)
        self.settings = dict(settings if settings is not None else flags_of(*sections))
        self.state = TrainerState()  # on the device, or a checkpoint's, once set up
        self.out = None  # the output folder, checked by setup()
        self.start = None  # the pretrained model or UNet config the run starts from (setup)
        self.tracker, self.tracker_options = None, {}
        self.accelerator = None
        self.parts = None  # TrainingParts (parts.py), built by setup()
        self.fid_hook = None  # --eval_fid_every
        self.push = None  # --push_to_hub (main process)
        self.progress = None  # the progress bar of train_epochs()
        self.last_log = (time.time(), 0)  # (time, step) of the last log line: the throughput's start
        self.last_saved = 0  # the step of the last checkpoint
        self.flags = None  # the last batch's collective flags: any non-finite loss, any stop request

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Check the flags, then the data, then create the output folder and the training parts: a
        run that fails on its flags or data leaves the disk as it was."""
        self.out = Path(self.output.resolved_output_dir(self.data.dataset))
        self._check_output_dir()
        self._check_flags()
        self.tracker, self.tracker_options = setup_tracker(self.output.tracker())
        self.accelerator = make_accelerator(self.training, self.out, self.tracker)
        data = load_training_data(
            self.accelerator,
            self.start,
            data=self.data,
            model=self.model,
            latent=self.latent,
            batch_size=self.training.batch_size,
            seed=self.training.seed,
            exclude=self.output.output_dir,
        )
        self.fid_hook = self._make_fid_hook() if self.fid.eval_fid_every else None
        prepare_output_dir(self.out, self.output.overwrite_output_dir, main=self.main)
        # --push_to_hub: the repository is created now, so a bad token or no network fails before training.
        self.push = TrainingPush(self.hub, self.out) if self.hub.push_to_hub and self.main else None
        self.accelerator.wait_for_everyone()
        start_schedule = self.start.scheduler_config if self.start is not None else None
        sections = {name: getattr(self, name) for name in PART_SECTIONS}
        self.parts = build_parts(
            self.accelerator, data.unet, data.data, **sections, vae=data.vae, scheduler_config=start_schedule
        )
        self.state = TrainerState.on(self.accelerator.device)
        self._print_notices()

    def _check_output_dir(self) -> None:
        output = self.output
        resume = check_output_dir(self.out, output.overwrite_output_dir, output.resume_from_checkpoint, self.settings)
        self.output = replace(output, resume_from_checkpoint=resume)
        self.settings["resume_from_checkpoint"] = resume

    def _make_fid_hook(self) -> FidHook:
        return FidHook(
            self.fid,
            self.data,
            eta=self.sampling.eta,
            seed=self.training.seed,
            batch_size=self.training.batch_size,
            settings=self.settings,
            out=self.out,
            accelerator=self.accelerator,
            resuming=bool(self.output.resume_from_checkpoint),
        )

    def _print_notices(self) -> None:
        if self.main:  # after the checks of flags and data: a bad input still gets one line
            warn_if_bf16_emulated(self.accelerator.mixed_precision, self.accelerator.device)
            notice = terminal_snr_notice(self.parts.noise_scheduler.config)
            if notice:
                logger.warning(notice)
        if host_memory.applied():  # set by the train command at its start (commands/common.py)
            logger.info(host_memory.applied())
        if self.parts.micro_batch:
            how = (
                ""
                if self.training.micro_batch_size
                else f" (auto on a {self.accelerator.device.type.upper()}; --micro_batch_size 0: one pass)"
            )
            logger.info(
                f"micro-batches: each batch of {self.training.batch_size} in passes of {self.parts.micro_batch} "
                f"images{how}"
            )

    def _check_flags(self) -> None:
        micro_batch, num_samples = self.training.micro_batch_size, self.sampling.num_samples
        if micro_batch is not None and micro_batch < 0:
            raise UsageError(f"--micro_batch_size must be >= 0 (0: the whole batch in one pass), got {micro_batch}")
        if (num_samples or 0) > GRID_MAX:  # every image of a training grid is held in memory
            raise UsageError(
                f"--num_samples {num_samples} is the size of the training sample grids; use at most {GRID_MAX} "
                f"(sample_ddpm.py writes any number)"
            )
        self.start = self._start_model()
        # --size the UNet cannot downsample fails now, not after loading the data (--latent: once the VAE
        # is loaded, parts.load_training_data).
        if self.data.size and self.start is None and not self.latent.latent:
            unet_kwargs(self.model, 1, self.data.size)

    def _start_model(self):
        """--pretrained_model_name_or_path (its UNet and noise schedule; the run's records take its T, betas
        and prediction type) or --model_config_name_or_path (a new UNet of that config); None: the model flags."""
        model, size, channels = self.model, self.data.size, self.data.channels
        if model.pretrained_model_name_or_path:
            start = load_pretrained(model.pretrained_model_name_or_path)
            check_data_format(start, size, channels)
            self._take_schedule(start.scheduler_config)
            return start
        if model.model_config_name_or_path:
            return unet_from_config(model.model_config_name_or_path, size, channels)
        return None

    def _take_schedule(self, scheduler_config) -> None:
        """A pretrained start brings its noise schedule: the run diffuses, and records, its T and betas."""
        taken = schedule_settings(scheduler_config, self.sampling.sample_timesteps)
        self.settings.update(taken)
        self.sampling = replace(self.sampling, sample_timesteps=taken.pop("sample_timesteps"))
        self.diffusion = replace(self.diffusion, **taken)

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.parts, self.state, self.out / "checkpoints", self.output.checkpoints_total_limit)

    def resume(self) -> None:
        """--resume_from_checkpoint: the checkpoint's weights, optimiser, RNG, EMA, data position and
        schedule; the log loses the lines of steps after it (they are trained again)."""
        resume = self.output.resume_from_checkpoint
        if resume:
            resumed = load_checkpoint(self.parts, self.out / "checkpoints", resume)
            if resumed is not None:
                self.state = resumed.state
                self._continue_schedule(resumed.planned_steps)
            if self.main and (self.out / "train_log.jsonl").exists():
                trim_log(self.out / "train_log.jsonl", self.state.global_step)
        if self.main:
            make_subdir(self.out, "samples")  # a link there is refused: the grids would land where it points
            write_json(self.out / "train_config.json", public_config(self.settings))
        if self.tracker == "tensorboard" and self.main:  # its event files go to OUTPUT_DIR/logs/TRACKER_PROJECT
            make_subdir(self.out, "logs", TRACKER_PROJECT)  # a link on the way is refused, not logged through
        if self.tracker:
            init_tracker(self.accelerator, public_config(self.settings), self.data.dataset, self.tracker_options)

    def _continue_schedule(self, planned_steps: int) -> None:
        """A resume with another --max_train_steps / --n_epochs: the LR of this step on the new schedule."""
        step, max_steps, lr_scheduler = self.state.global_step, self.parts.max_steps, self.parts.lr_scheduler
        if planned_steps != max_steps and step < max_steps:
            lr_scheduler.last_epoch -= 1
            lr_scheduler.step()  # the optimiser kept the old schedule's learning rate
            logger.info(
                f"notice: the run was planned for {planned_steps} steps and now has {max_steps}; "
                f"the LR schedule continues from step {step} on the new length"
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
        state, max_steps = self.state, self.parts.max_steps
        self.progress = tqdm(
            total=max_steps, initial=state.global_step, desc="training", disable=not self.main, unit="step"
        )
        self.last_log = (time.time(), state.global_step)
        self.last_saved = state.global_step
        self.parts.unet.train()
        for epoch in itertools.count(state.epoch) if state.global_step < max_steps else ():
            for batch in self.epoch_batches(epoch):
                if self.run_step(batch, stop) and self.end_of_step(stop):
                    return True
                if state.global_step >= max_steps:
                    break
            self.end_of_epoch(epoch)
            if state.global_step >= max_steps:
                break
        self.progress.close()
        return False

    def epoch_batches(self, epoch: int):
        """The epoch's batches, from where the data stood on resume (batches already consumed are skipped)."""
        loader = self.parts.loader
        loader.set_epoch(epoch)
        skip = self.state.batches if epoch == self.state.epoch else 0
        batches = loader
        if skip:
            batches = loader.skip(skip) if self.data.streaming else self.accelerator.skip_first_batches(loader, skip)
        for index, (batch,) in enumerate(batches, start=skip):
            self.state.epoch, self.state.batches = epoch, index + 1
            yield batch

    def run_step(self, batch: torch.Tensor, stop=None) -> bool:
        """One batch through the parts (train_step.py). True when an optimiser update was made; a
        non-finite loss skips it (--skip_nonfinite_steps) or stops."""
        x0 = model_input(self.parts, batch)
        self.flags = train_step(self.parts, self.state, x0, bool(stop and stop.requested))
        if self.flags[0] > 0:
            return self._skip_nonfinite()
        return self.accelerator.sync_gradients

    def _skip_nonfinite(self) -> bool:
        if not self.training.skip_nonfinite_steps:
            kept = list_checkpoints(self.out / "checkpoints")
            where = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved yet"
            self.progress.close()  # the error line starts a line of its own
            raise DDPMError(
                f"the loss became non-finite at step {self.state.global_step + 1}; {where}; lower --lr, "
                f"use --mixed_precision no, or pass --skip_nonfinite_steps to skip such updates"
            )
        self.state.skipped_nonfinite += 1
        return False

    def end_of_step(self, stop: StopRequest) -> bool:
        """After an optimiser update: LR, EMA, log, checkpoint. True when a signal stops the run here."""
        after_update(self.parts, self.state)
        step = self.state.global_step
        self.progress.update(1)
        if step % self.output.logging_steps == 0 or step == self.parts.max_steps:
            self.log_step()
        if step % self.output.checkpointing_steps == 0:
            self.save_checkpoint()
            self.last_saved = step
            if self.push and self.hub.hub_strategy == "every_save":
                self.push.snapshot(step, functools.partial(export_pipeline, self.parts, self.settings, step=step))
        if self.flags[1] > 0:
            self.stop_now()
            return True
        return False

    def log_step(self) -> None:
        """The mean loss since the last line, the LR and the throughput: train_log.jsonl, the tracker, the bar."""
        state, accelerator = self.state, self.accelerator
        mean_loss = accelerator.reduce(state.loss_sum / max(state.loss_count, 1), "mean").item()
        now, (last_time, last_step) = time.time(), self.last_log
        training = self.training
        images_per_update = training.batch_size * accelerator.num_processes * training.gradient_accumulation_steps
        record = dict(
            step=state.global_step,
            epoch=state.epoch,
            loss=mean_loss,
            lr=self.parts.lr_scheduler.get_last_lr()[0],
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
        logger.info(
            f"stopped at step {step}; checkpoint saved to {path}. Resume with the same "
            f"command plus --resume_from_checkpoint latest"
        )
        self.accelerator.end_training()

    def end_of_epoch(self, epoch: int) -> None:
        """The EMA sample grid (first epoch, every --sample_and_save_freq, last) and --eval_fid_every."""
        last = self.state.global_step >= self.parts.max_steps
        if epoch == 0 or (epoch + 1) % self.output.sample_and_save_freq == 0 or last:
            self.save_samples(epoch)
        if self.fid_hook and ((epoch + 1) % self.fid.eval_fid_every == 0 or last):
            self.fid_hook(self.parts, epoch, self.state.global_step)

    def save_samples(self, epoch: int) -> None:
        parts = self.parts
        if self.main:
            with ema_weights(parts.ema, parts.model), self.accelerator.autocast():
                # The same noise every time, so grids compare across epochs.
                images = generate(
                    parts.model,
                    parts.sampler,
                    self.sampling.num_samples or 16,
                    parts.sample_steps,
                    eta=self.sampling.eta,
                    seed=self.training.seed,
                    batch_size=self.training.batch_size,
                    vae=parts.vae,
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
    def finish(self) -> None:
        """The last checkpoint and the pipeline (a signal now lets the save finish), then the Hub push."""
        step, checkpoint_root = self.state.global_step, self.out / "checkpoints"
        with StopRequest(final=True) as late:
            if not (checkpoint_root / f"{CHECKPOINT_PREFIX}{step}").exists():
                self.save_checkpoint()
            if self.main:
                save_pipeline_atomically(self.out, self.parts, self.settings, step)
                logger.info(
                    f"saved the pipeline (EMA weights) to {self.out}; sample it with: python sample_ddpm.py "
                    "--checkpoint "
                    f"{shlex.quote(str(self.out))}"
                )
        if late.requested:
            logger.info(
                f"stopped at step {step}; checkpoint saved to {checkpoint_root / f'{CHECKPOINT_PREFIX}{step}'}. "
                f"The run had finished: its pipeline is saved too"
            )
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.push:
            self.push.final()  # a failure leaves the saved output as it is: one line, non-zero exit (DDPMError)
