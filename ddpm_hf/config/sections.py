"""The settings in sections: one small dataclass per concern, each checking itself.

`DDPMConfig` (options.py) is the flat table of flags and YAML keys, with their defaults and help; a
command turns it into `Sections` (`validate(cfg)` runs every check and returns them) and hands the library only the
sections a part needs, or plain arguments. A section's defaults are the flags' own (defined once, in
options.py); inside, `--ddpm` is the DDIM `eta` and `--decay` the `weight_decay`.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

from ..util.errors import UsageError, short
from .feature_checks import MASKS, check_mask_file
from .options import FIELDS, DDPMConfig

# Flags whose name inside the library says what they are.
RENAMED = {"ddpm": "eta", "decay": "weight_decay"}
FLAG_OF = {inner: flag for flag, inner in RENAMED.items()}
NOT_NEGATIVE = "--num_workers and --warmup must be >= 0"
OWN_UNET = "--pretrained_model_name_or_path brings its own UNet; drop --model_config_name_or_path and --latent"


def _flag(name: str):
    """The default of flag `name`, taken from DDPMConfig (defaults live in one place)."""
    source = FIELDS[name]
    if source.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=source.default_factory)
    return dataclasses.field(default=source.default)


class _Section:
    """Shared by the sections: `validate()` refuses a non-finite float (argparse and YAML read 'nan' and
    'inf' as numbers), then runs the section's own checks."""

    def validate(self) -> "_Section":
        for f in fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise UsageError(f"--{FLAG_OF.get(f.name, f.name)} must be a finite number, got {short(v)}")
        self.check()
        return self

    def check(self) -> None:
        """The section's own rules (none by default)."""


def _positive(section, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        if (value is not None or not optional) and value <= 0:
            shown = short(value) if optional else value
            raise UsageError(f"--{name} must be a positive integer, got {shown}")


@dataclass
class DataSettings(_Section):
    """Which images, and how they are read. size/channels None: the dataset's own (or the model's)."""

    dataset: str = _flag("dataset")
    size: Optional[int] = _flag("size")
    channels: Optional[int] = _flag("channels")
    image_column: Optional[str] = _flag("image_column")
    dataset_config_name: Optional[str] = _flag("dataset_config_name")
    medmnist_root: Optional[str] = _flag("medmnist_root")
    max_train_samples: Optional[int] = _flag("max_train_samples")
    num_workers: int = _flag("num_workers")
    streaming: bool = _flag("streaming")
    shuffle_buffer_size: int = _flag("shuffle_buffer_size")
    cache_dir: Optional[str] = _flag("cache_dir")
    crop: str = _flag("crop")

    def check(self) -> None:
        _positive(self, "size", "max_train_samples", optional=True)
        if self.num_workers < 0:
            raise UsageError(NOT_NEGATIVE)
        if self.shuffle_buffer_size <= 0:
            raise UsageError(f"--shuffle_buffer_size must be a positive integer, got {self.shuffle_buffer_size}")

    def without_format(self) -> "DataSettings":
        """These settings with --size/--channels dropped: a loaded model decides the format."""
        return dataclasses.replace(self, size=None, channels=None)


@dataclass
class ModelSettings(_Section):
    """The UNet: the openai flags mapped onto UNet2DModel, or where a UNet (config) comes from."""

    model_channels: int = _flag("model_channels")
    num_res_blocks: int = _flag("num_res_blocks")
    attention_resolutions: List[int] = _flag("attention_resolutions")
    dropout: float = _flag("dropout")
    channel_mult: List[int] = _flag("channel_mult")
    conv_resample: bool = _flag("conv_resample")
    dims: int = _flag("dims")
    num_heads: int = _flag("num_heads")
    num_head_channels: int = _flag("num_head_channels")
    use_scale_shift_norm: bool = _flag("use_scale_shift_norm")
    resblock_updown: bool = _flag("resblock_updown")
    use_new_attention_order: bool = _flag("use_new_attention_order")
    pretrained_model_name_or_path: Optional[str] = _flag("pretrained_model_name_or_path")
    model_config_name_or_path: Optional[str] = _flag("model_config_name_or_path")

    def check(self) -> None:
        _positive(self, "model_channels", "num_res_blocks")
        self._check_expressible()
        self._check_heads()
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.pretrained_model_name_or_path and self.model_config_name_or_path:
            raise UsageError(OWN_UNET)

    def widths(self) -> List[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def _check_expressible(self) -> None:
        if self.dims != 2:
            raise UsageError(
                f"--dims {self.dims} is not supported: diffusers' UNet2DModel and the image data pipeline are 2-D "
                "only; use --dims 2"
            )
        if not self.conv_resample:
            raise UsageError(
                "--no-conv_resample is not supported: UNet2DModel always resamples with learned convolutions"
            )
        if not self.channel_mult or self.channel_mult[0] != 1:
            raise UsageError(
                "--channel_mult must start with 1 (UNet2DModel ties the timestep embedding to the first level's width)"
            )
        for m in self.channel_mult:
            if m <= 0 or (self.model_channels * m) % 32:
                raise UsageError(
                    f"--model_channels {self.model_channels} x --channel_mult {m} is not divisible into 32 GroupNorm "
                    "groups; use a multiple of 32"
                )
        if any(a <= 0 or a & (a - 1) for a in self.attention_resolutions):
            raise UsageError("--attention_resolutions are downsample factors (1, 2, 4, ...), powers of two")

    def _check_heads(self) -> None:
        if self.num_head_channels == -1 and len(set(self.widths())) > 1:
            raise UsageError(
                "--num_head_channels -1 (fixed --num_heads) with levels of different widths is not expressible in "
                "UNet2DModel; set --num_head_channels"
            )
        if self.num_head_channels != -1 and (
            self.num_head_channels <= 0 or any(w % self.num_head_channels for w in self.widths())
        ):
            raise UsageError(
                f"--num_head_channels {self.num_head_channels} must divide every level's width "
                f"({', '.join(str(w) for w in self.widths())})"
            )


@dataclass
class DiffusionSettings(_Section):
    """The noise schedule and the training objective."""

    timesteps: int = _flag("timesteps")
    beta_start: float = _flag("beta_start")
    beta_end: float = _flag("beta_end")
    loss_type: str = _flag("loss_type")
    beta_schedule: str = _flag("beta_schedule")
    prediction_type: str = _flag("prediction_type")
    clip_sample: bool = _flag("clip_sample")
    rescale_betas_zero_snr: bool = _flag("rescale_betas_zero_snr")
    timestep_spacing: str = _flag("timestep_spacing")

    def check(self) -> None:
        _positive(self, "timesteps")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise UsageError("betas must satisfy 0 < --beta_start < --beta_end < 1")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise UsageError(
                "--rescale_betas_zero_snr leaves no signal at t = T-1, where predicted noise says nothing about the "
                "image; add --prediction_type v_prediction (or sample)"
            )


@dataclass
class LatentSettings(_Section):
    """Diffusion in a VAE's latent space (--latent)."""

    latent: bool = _flag("latent")
    vae: str = _flag("vae")
    latent_mode: str = _flag("latent_mode")
    cache_latents: bool = _flag("cache_latents")


@dataclass
class TrainingSettings(_Section):
    """The optimisation: batches, optimiser, LR schedule, EMA, precision, the step's options."""

    batch_size: int = _flag("batch_size")
    n_epochs: int = _flag("n_epochs")
    max_train_steps: Optional[int] = _flag("max_train_steps")
    lr: float = _flag("lr")
    warmup: int = _flag("warmup")
    weight_decay: float = _flag("decay")
    adam_beta1: float = _flag("adam_beta1")
    adam_beta2: float = _flag("adam_beta2")
    adam_epsilon: float = _flag("adam_epsilon")
    ema_rate: float = _flag("ema_rate")
    ema_warmup: bool = _flag("ema_warmup")
    ema_inv_gamma: float = _flag("ema_inv_gamma")
    ema_power: float = _flag("ema_power")
    snr_gamma: Optional[float] = _flag("snr_gamma")
    max_grad_norm: Optional[float] = _flag("max_grad_norm")
    random_flip: bool = _flag("random_flip")
    lr_scheduler: str = _flag("lr_scheduler")
    lr_warmup_steps: Optional[int] = _flag("lr_warmup_steps")
    gradient_accumulation_steps: int = _flag("gradient_accumulation_steps")
    micro_batch_size: Optional[int] = _flag("micro_batch_size")
    mixed_precision: Optional[str] = _flag("mixed_precision")
    seed: int = _flag("seed")
    skip_nonfinite_steps: bool = _flag("skip_nonfinite_steps")
    compile: bool = _flag("compile")

    def check(self) -> None:
        _positive(self, "batch_size", "n_epochs", "gradient_accumulation_steps")
        _positive(self, "max_train_steps", optional=True)
        if self.warmup < 0:
            raise UsageError(NOT_NEGATIVE)
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UsageError(f"--snr_gamma must be > 0 (5 is the paper's value), got {self.snr_gamma}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UsageError(f"--max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not (self.ema_inv_gamma > 0 and self.ema_power > 0):
            raise UsageError(
                f"--ema_inv_gamma and --ema_power must be > 0, got {self.ema_inv_gamma} and {self.ema_power}"
            )
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise UsageError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_epsilon > 0):
            raise UsageError("--adam_beta1 and --adam_beta2 must be in [0, 1) and --adam_epsilon > 0")
        if self.lr <= 0 or not 0 <= self.ema_rate < 1 or self.weight_decay < 0:
            raise UsageError("--lr must be > 0, --ema_rate in [0, 1) and --decay >= 0")

    def lr_warmup(self, steps_per_epoch: int) -> int:
        """Warm-up optimiser steps of the LR schedule: --lr_warmup_steps, else for one_cycle the
        original's --warmup epochs."""
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return self.warmup * steps_per_epoch if self.lr_scheduler == "one_cycle" else 0


@dataclass
class OutputSettings(_Section):
    """Where a run writes, how often it saves and logs, and what it reports to."""

    output_dir: Optional[str] = _flag("output_dir")
    overwrite_output_dir: bool = _flag("overwrite_output_dir")
    resume_from_checkpoint: Optional[str] = _flag("resume_from_checkpoint")
    checkpointing_steps: int = _flag("checkpointing_steps")
    checkpoints_total_limit: Optional[int] = _flag("checkpoints_total_limit")
    sample_and_save_freq: int = _flag("sample_and_save_freq")
    logging_steps: int = _flag("logging_steps")
    report_to: str = _flag("report_to")
    no_wandb: bool = _flag("no_wandb")
    log_level: str = _flag("log_level")

    def check(self) -> None:
        _positive(self, "checkpointing_steps", "logging_steps", "sample_and_save_freq")
        _positive(self, "checkpoints_total_limit", optional=True)
        if self.no_wandb and self.report_to == "tensorboard":
            raise UsageError(
                "--no_wandb turns every tracker off, so it contradicts --report_to tensorboard; pass only one of them"
            )
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise UsageError(
                "--resume_from_checkpoint continues a run and --overwrite_output_dir starts it over; pass only one "
                "of them"
            )

    def resolved_output_dir(self, dataset: str) -> str:
        """--output_dir, else outputs/ddpm_<dataset's name>."""
        return self.output_dir or f"outputs/ddpm_{Path(dataset).name}"

    def tracker(self) -> str:
        return "none" if self.no_wandb else self.report_to


@dataclass
class SamplingSettings(_Section):
    """Which model to sample and how: the scheduler, its steps and the DDIM eta (--ddpm)."""

    checkpoint: Optional[str] = _flag("checkpoint")
    revision: Optional[str] = _flag("revision")
    eta: float = _flag("ddpm")
    sample_timesteps: int = _flag("sample_timesteps")
    scheduler: str = _flag("scheduler")
    num_samples: Optional[int] = _flag("num_samples")

    def check(self) -> None:
        _positive(self, "sample_timesteps")
        _positive(self, "num_samples", optional=True)
        if self.eta < 0:
            raise UsageError(f"--ddpm (the DDIM eta) must be >= 0, got {self.eta}")


@dataclass
class FIDSettings(_Section):
    """FID (and KID, DINOv2 / PRDC): the reference images, the feature extractor, the in-training FID."""

    fid: bool = _flag("fid")
    fid_reference: Optional[str] = _flag("fid_reference")
    fid_reference_split: str = _flag("fid_reference_split")
    fid_reference_max: Optional[int] = _flag("fid_reference_max")
    inception_weights: Optional[str] = _flag("inception_weights")
    fid_cache_dir: Optional[str] = _flag("fid_cache_dir")
    fid_feature_extractor: str = _flag("fid_feature_extractor")
    dinov2_model: str = _flag("dinov2_model")
    eval_fid_every: int = _flag("eval_fid_every")
    fid_num_samples: int = _flag("fid_num_samples")
    save_best_fid: bool = _flag("save_best_fid")

    def check(self) -> None:
        if self.eval_fid_every < 0 or self.fid_num_samples < 2:
            raise UsageError("--eval_fid_every must be >= 0 and --fid_num_samples >= 2 (FID needs two images)")
        if self.fid_reference_max is not None and self.fid_reference_max < 2:
            raise UsageError(f"--fid_reference_max must be at least 2, got {self.fid_reference_max}")
        if self.save_best_fid and not self.eval_fid_every:
            raise UsageError("--save_best_fid needs --eval_fid_every N (the FID it keeps the best of)")
        if not self.dinov2_model.strip():
            raise UsageError("--dinov2_model must be a Hub id (facebook/dinov2-base) or a local folder")


@dataclass
class OODRunSettings(_Section):
    """What the OOD command scores, with which score, and the detector it fits or uses (the library's
    own `ood.OODSettings` is built from these, the sampling and the training sections)."""

    out_dataset: str = _flag("out_dataset")
    score: str = _flag("score")
    lpips: bool = _flag("lpips")
    recon_factor: float = _flag("recon_factor")
    recon_factors: Optional[List[float]] = _flag("recon_factors")
    recon_draws: int = _flag("recon_draws")
    max_samples: Optional[int] = _flag("max_samples")
    stats_samples: int = _flag("stats_samples")
    path_steps: int = _flag("path_steps")
    msma_levels: int = _flag("msma_levels")
    patch_grid: int = _flag("patch_grid")
    hidden_levels: List[float] = _flag("hidden_levels")
    hidden_grid: int = _flag("hidden_grid")
    fit: bool = _flag("fit")
    detector: Optional[str] = _flag("detector")
    images: Optional[str] = _flag("images")
    tpr: float = _flag("tpr")

    def check(self) -> None:
        _positive(self, "max_samples", optional=True)
        if not 0 < self.recon_factor <= 1:
            raise UsageError(f"--recon_factor must be in (0, 1], got {self.recon_factor}")
        if self.recon_factors is not None and not all(0 < f <= 1 for f in self.recon_factors):
            shown = short(" ".join(map(str, self.recon_factors)))
            raise UsageError(f"--recon_factors must all be in (0, 1], got {shown}")
        if self.recon_draws < 1:
            raise UsageError(f"--recon_draws must be a positive integer, got {self.recon_draws}")
        if self.stats_samples < 2:
            raise UsageError(
                f"--stats_samples must be at least 2 (a standard deviation needs two images), got {self.stats_samples}"
            )
        if not 0 < self.tpr < 1:
            raise UsageError(f"--tpr must be in (0, 1) (the share of in-distribution images accepted), got {self.tpr}")
        if self.fit and self.detector:
            raise UsageError("--fit saves a detector and --detector uses one; pass one of them")
        if (self.images is None) != (self.detector is None):
            raise UsageError("--detector DIR and --images PATH go together: the detector scores the images")


@dataclass
class LikelihoodSettings(_Section):
    """--nll: bits per dimension of the test images."""

    nll: bool = _flag("nll")
    nll_timesteps: Optional[int] = _flag("nll_timesteps")

    def check(self) -> None:
        if self.nll_timesteps is not None and self.nll_timesteps < 3:
            raise UsageError(
                "--nll_timesteps must be at least 3 (L_0 and two sampled KL terms, for a standard error), got "
                f"{self.nll_timesteps}"
            )


@dataclass
class InpaintSettings(_Section):
    """--inpaint: RePaint with a mask."""

    inpaint: bool = _flag("inpaint")
    mask: str = _flag("mask")
    jump_length: int = _flag("jump_length")
    jump_n_sample: int = _flag("jump_n_sample")

    def check(self) -> None:
        for name in ("jump_length", "jump_n_sample"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.mask not in MASKS and not (self.mask.lower().endswith(".png") and os.path.isfile(self.mask)):
            raise UsageError(f"--mask must be one of {', '.join(MASKS)} or an existing .png file, got {self.mask!r}")
        if self.mask not in MASKS:
            check_mask_file(self.mask)


@dataclass
class HubSettings(_Section):
    """Pushing to the Hub: where, how often, with which card metadata."""

    push_to_hub: bool = _flag("push_to_hub")
    hub_strategy: str = _flag("hub_strategy")
    hub_model_id: Optional[str] = _flag("hub_model_id")
    hub_token: Optional[str] = _flag("hub_token")
    hub_private_repo: bool = _flag("hub_private_repo")
    hub_license: str = _flag("hub_license")

    def check(self) -> None:
        if self.hub_model_id is not None and (not self.hub_model_id.strip("/") or self.hub_model_id.count("/") > 1):
            raise UsageError(f"--hub_model_id must be 'name' or 'user/name', got {short(repr(self.hub_model_id))}")


@dataclass
class Sections:
    """Every section of one run; `of(cfg)` sorts the flat flags into them, `flat()` gives them back."""

    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    diffusion: DiffusionSettings = dataclasses.field(default_factory=DiffusionSettings)
    latent: LatentSettings = dataclasses.field(default_factory=LatentSettings)
    training: TrainingSettings = dataclasses.field(default_factory=TrainingSettings)
    output: OutputSettings = dataclasses.field(default_factory=OutputSettings)
    sampling: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    fid: FIDSettings = dataclasses.field(default_factory=FIDSettings)
    ood: OODRunSettings = dataclasses.field(default_factory=OODRunSettings)
    likelihood: LikelihoodSettings = dataclasses.field(default_factory=LikelihoodSettings)
    inpaint: InpaintSettings = dataclasses.field(default_factory=InpaintSettings)
    hub: HubSettings = dataclasses.field(default_factory=HubSettings)

    @classmethod
    def of(cls, cfg: DDPMConfig) -> "Sections":
        values = cfg.to_dict()
        made = {}
        for section in fields(cls):
            kind = section.default_factory
            made[section.name] = kind(**{f.name: values[FLAG_OF.get(f.name, f.name)] for f in fields(kind)})
        return cls(**made)

    def flat(self) -> dict:
        """The flags' values by flag name: what a run records (train_config.json) and compares on resume."""
        return flags_of(*(getattr(self, section.name) for section in fields(self)))

    def pick(self, *names: str) -> dict:
        """The named sections, as keyword arguments: `Trainer(**sections.pick(*TRAINER_SECTIONS))`."""
        return {name: getattr(self, name) for name in names}

    def validate(self, timesteps_known: bool = True) -> "Sections":
        """Every section's checks, then the rules that join two sections. `timesteps_known`: False where T
        comes from the loaded model (sampling and OOD without --timesteps)."""
        for section in fields(self):
            getattr(self, section.name).validate()
        if timesteps_known and self.sampling.sample_timesteps > self.diffusion.timesteps:
            raise UsageError(
                f"--sample_timesteps {self.sampling.sample_timesteps} is larger than --timesteps "
                f"{self.diffusion.timesteps}; use at most {self.diffusion.timesteps}"
            )
        self._check_exclusive()
        return self

    def _check_exclusive(self) -> None:
        """Flags of two sections that cannot go together (docs/reliability.md)."""
        data, latent, model = self.data, self.latent, self.model
        if data.streaming and not self.training.max_train_steps:
            raise UsageError(
                "--streaming has no epochs to count (a stream has no known length); set the length of training "
                "with --max_train_steps N"
            )
        if self.training.random_flip and latent.cache_latents:
            raise UsageError(
                "--random_flip mirrors images, but --cache_latents trains on latents encoded once; drop one of them"
            )
        if data.streaming and latent.cache_latents:
            raise UsageError(
                "--cache_latents encodes the whole dataset once, which --streaming never holds; drop one of them"
            )
        if model.pretrained_model_name_or_path and latent.latent:
            raise UsageError(OWN_UNET)
        if model.model_config_name_or_path and latent.latent:
            raise UsageError("--model_config_name_or_path with --latent is not supported; drop one of them")
        modes = [flag for flag, on in (("fid", self.fid.fid), ("nll", self.likelihood.nll)) if on]
        modes += ["inpaint"] if self.inpaint.inpaint else []
        if len(modes) > 1:
            raise UsageError(
                f"--{' and --'.join(modes)} are different runs of the sample command; pass only one of them"
            )


def flags_of(*sections: _Section) -> dict:
    """The values of some sections by flag name (`eta` is --ddpm again): what a run records of them."""
    values = {}
    for section in sections:
        for name, value in dataclasses.asdict(section).items():
            values[FLAG_OF.get(name, name)] = value
    return values


def validate(cfg: DDPMConfig, timesteps_known: bool = True) -> Sections:
    """The sections of `cfg`, every check run: what the scripts and the Python API both do first."""
    return Sections.of(cfg).validate(timesteps_known)
