"""Saving a trained model as a standard diffusers pipeline folder, and loading one back.

A ddpm-hf output is `DDIMPipeline` (`model_index.json`, `unet/` with the EMA weights as
safetensors, `scheduler/` with T, betas and the original's DDIM settings) plus
`ddpm_hf_config.json`, the full training config. `DiffusionPipeline.from_pretrained`
loads it with no custom code. A latent model (`--latent`) is saved as diffusers' stock
`LDMPipeline` instead, with the frozen AutoencoderKL in `vqvae/` (LDMPipeline divides the
latents by `vqvae.config.scaling_factor` and calls `decode`, as training does). `load_pipeline`
reads a folder or Hub model back; `ddpm_hf.models.loader.load_model` is the one loader of every command
(it also takes an original GenerativeZoo `.pt` checkpoint, converted on the fly by convert_gzoo.py).
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..util.errors import DDPMError, UsageError, first_line, short
from ..util.files import read_json, safetensors_problem

CONFIG_NAME = "ddpm_hf_config.json"
SECRET_KEYS = ("hub_token",)
ACCEPTED = (
    "--checkpoint takes a pipeline folder (holding model_index.json, e.g. a train_ddpm.py --output_dir), "
    "a Hub model id (user/name) or an original GenerativeZoo .pt file"
)
WEIGHT_SUFFIXES = (".pth", ".safetensors", ".bin", ".ckpt", ".pkl")
REPAIR = "re-save the pipeline, or restore the file"
UNET_CLASS = "UNet2DModel"  # the only denoiser the commands call (unconditional: no text, no class labels)
MAX_SAMPLE_SIZE = 4096  # the largest model side taken: 100000 would ask for an 80 GB noise tensor at batch 1
# diffusers' own lines beside the one-line error a failed load becomes (e.g. a pickled .bin refused).
LOAD_NOISE = {
    "diffusers.pipelines.pipeline_utils": "Expected types for vqvae",
    "diffusers.models.modeling_utils": "An error occurred while trying to fetch",
}


@dataclass
class LoadedModel:
    unet: torch.nn.Module
    scheduler_config: dict  # T and betas of the training noise schedule
    vae: Optional[torch.nn.Module] = None
    train_config: dict = field(default_factory=dict)
    source: str = ""


def public_config(cfg_dict: dict) -> dict:
    """The config without secrets, for files, logs and model cards."""
    return {k: v for k, v in cfg_dict.items() if k not in SECRET_KEYS}


def save_pipeline(output_dir, unet, scheduler, train_config: dict, vae=None) -> None:
    from diffusers import DDIMPipeline

    if vae is None:
        pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    else:
        from diffusers import LDMPipeline

        pipe = LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    # A plain write: training saves into a partial folder that is renamed into place whole (its own
    # `writing` block names the pipeline and removes the partial folder on a failure).
    Path(output_dir, CONFIG_NAME).write_text(json.dumps(public_config(train_config), indent=2, default=str))


def _read_train_config(source, revision) -> dict:
    path = Path(source, CONFIG_NAME)
    if not path.exists() and not os.path.isdir(source):
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, CONFIG_NAME, revision=revision))
        except Exception:
            return {}
    config = read_json(path, REPAIR) if path.exists() else {}
    if not isinstance(config, dict):  # later read with .get(): a list or a number would break --fid deep inside
        raise DDPMError(f"{path} is damaged (not a JSON object); {REPAIR}")
    return config


def refuse_weight_file(checkpoint: str) -> None:
    """A weights file other than an original .pt: say what --checkpoint takes (and which folder to pass)."""
    path = Path(checkpoint)
    if not (path.suffix in WEIGHT_SUFFIXES or path.is_file()):
        return
    inside = next((p for p in path.parents if (p / "model_index.json").is_file()), None)
    hint = f"; it is part of the pipeline folder {inside}: pass that folder" if inside else ""
    state = f"is a {path.suffix or 'plain'} file" if path.is_file() else "does not exist"
    raise UsageError(f"checkpoint file {checkpoint} {state}; {ACCEPTED}{hint}")


def check_pipeline_folder(folder) -> None:
    """Every config (JSON) and weights file (safetensors header) of a pipeline folder's components is
    readable; a damaged one is one line naming it (instead of a traceback from deep in diffusers)."""
    folder = Path(folder)
    advice = REPAIR
    index = read_json(folder / "model_index.json", advice)
    if not isinstance(index, dict):
        raise DDPMError(f"{folder / 'model_index.json'} is damaged (not a JSON object); {advice}")
    _check_unet_class(index.get("unet"), folder / "model_index.json")
    for component in sorted(k for k, v in index.items() if isinstance(v, list) and (folder / k).is_dir()):
        for config in sorted((folder / component).glob("*.json")):
            if not isinstance(read_json(config, advice), dict):
                raise DDPMError(f"{config} is damaged (not a JSON object); {advice}")
        for weights in sorted((folder / component).glob("*.safetensors")):
            problem = safetensors_problem(weights)
            if problem:
                raise DDPMError(f"{weights} is damaged ({problem}); {advice}")
        _refuse_pickled_only(folder / component)


def _refuse_pickled_only(component: Path) -> None:
    """Weights only as a pickle (.bin, .pth, .ckpt): never loaded, since unpickling can run code."""
    pickled = sorted(p.name for p in component.iterdir() if p.suffix in (".bin", ".pth", ".ckpt", ".pkl"))
    if pickled and not any(component.glob("*.safetensors")):
        raise DDPMError(
            f"{component} holds its weights only as a pickle ({', '.join(pickled[:2])}), which is never loaded "
            f"(unpickling can run code); re-save the model with save_pretrained(..., safe_serialization=True)"
        )


def _check_unet_class(entry, index_path) -> None:
    """model_index.json's unet must be a UNet2DModel: diffusers would load a conditional UNet (which
    fails at the first step, wanting text embeddings) or an autoencoder (a meta-tensor error) instead."""
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
    if name != UNET_CLASS:
        raise UsageError(
            f"{index_path} names {short(name)} as the unet; the commands take a pipeline whose unet is an "
            f"unconditional {UNET_CLASS} (a DDPM/DDIM pipeline, e.g. a train_ddpm.py --output_dir)"
        )


def _positive_int(value, limit: Optional[int] = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= (limit or value)


def _unit_interval(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def component_problem(unet_config: dict, scheduler_config: dict) -> Optional[tuple]:
    """(file, what is wrong) for values no command can use (valid JSON, impossible settings), else None;
    checked right after loading, so a hand-edited folder fails before any work instead of at a division
    by zero, a negative tensor size or an 80 GB allocation."""
    unet, sched = "unet/config.json", "scheduler/scheduler_config.json"
    size = unet_config.get("sample_size")
    if not _positive_int(size, MAX_SAMPLE_SIZE):
        return unet, f"sample_size must be an integer from 1 to {MAX_SAMPLE_SIZE} (pixels), got {short(repr(size))}"
    for key in ("in_channels", "out_channels"):
        if not _positive_int(unet_config.get(key), 64):
            return unet, f"{key} must be an integer from 1 to 64, got {short(repr(unet_config.get(key)))}"
    T = scheduler_config.get("num_train_timesteps")
    if not _positive_int(T):
        return sched, f"num_train_timesteps must be a positive integer, got {short(repr(T))}"
    if scheduler_config.get("trained_betas") is None:
        for key in ("beta_start", "beta_end"):
            if not _unit_interval(scheduler_config.get(key)):
                return sched, f"{key} must be a number between 0 and 1, got {short(repr(scheduler_config.get(key)))}"
    return None


def _check_components(pipe, source: str) -> None:
    from diffusers import UNet2DModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DModel):  # a Hub model (a local folder's model_index.json is checked before)
        raise UsageError(
            f"{source} holds a {type(unet).__name__} as its unet; the commands take an unconditional {UNET_CLASS}"
        )
    problem = component_problem(dict(unet.config), dict(pipe.scheduler.config))
    if problem:
        raise DDPMError(f"{Path(source, problem[0])}: {problem[1]}; {REPAIR}")


class _DropMessages:
    """A logging filter that drops records starting with `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def load_pipeline(source: str, revision: Optional[str] = None, device="cpu") -> LoadedModel:
    """A pipeline folder or Hub model (already checked to exist) -> LoadedModel, with damaged or
    mismatching weights reported in one line. diffusers' "Loading pipeline components" bar and its
    vqvae type-hint warning are kept out of the commands' output."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    # LDMPipeline's type hint names VQModel; the AutoencoderKL it holds is what it decodes with. A refused
    # pickled .bin is our one error line, without diffusers' own "An error occurred" line before it.
    quiet = {name: _DropMessages(prefix) for name, prefix in LOAD_NOISE.items()}
    for name, drop in quiet.items():
        diffusers_logging.get_logger(name).addFilter(drop)
    # No "Loading pipeline components..." bar in every command's output: loading takes a second.
    bar_was_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(source, revision=revision, use_safetensors=True)
    except Exception as err:
        raise _load_error(source, err) from None
    finally:
        for name, drop in quiet.items():
            diffusers_logging.get_logger(name).removeFilter(drop)
        if bar_was_on:
            diffusers_logging.enable_progress_bar()
    _check_components(pipe, source)
    unet = pipe.unet.to(device).eval()
    vae = getattr(pipe, "vqvae", None)
    if vae is not None:
        vae = vae.requires_grad_(False).to(device).eval()  # on the UNet's device: decoding never mixes devices
    return LoadedModel(unet, dict(pipe.scheduler.config), vae, _read_train_config(source, revision), source)


def _load_error(source: str, err: Exception) -> DDPMError:
    message = first_line(err) or type(err).__name__
    where = "folder" if os.path.isdir(source) else "Hub model"
    shape = re.search(
        r"(\S+) expected shape (torch\.Size\(\[[\d, ]*\]\)), but got (torch\.Size\(\[[\d, ]*\]\))", message
    )
    if shape:  # weights and config.json disagree: a damaged or hand-edited folder
        return DDPMError(
            f"the pipeline {where} {source} does not match its own config ({shape[1]} should be "
            f"{shape[2]} but the weights hold {shape[3]}); re-save it, or restore its unet/config.json"
        )
    return DDPMError(f"cannot load the pipeline {where} {source} ({type(err).__name__}: {message})")
