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

from ..util.errors import DDPMError, UsageError
from ..util.files import read_json, safetensors_problem

CONFIG_NAME = "ddpm_hf_config.json"
SECRET_KEYS = ("hub_token",)
ACCEPTED = (
    "--checkpoint takes a pipeline folder (holding model_index.json, e.g. a train_ddpm.py --output_dir), "
    "a Hub model id (user/name) or an original GenerativeZoo .pt file"
)
WEIGHT_SUFFIXES = (".pth", ".safetensors", ".bin", ".ckpt", ".pkl")


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
    return read_json(path, "re-save the pipeline, or restore the file") if path.exists() else {}


def _refuse_weight_file(checkpoint: str) -> None:
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
    advice = "re-save the pipeline, or restore the file"
    index = read_json(folder / "model_index.json", advice)
    if not isinstance(index, dict):
        raise DDPMError(f"{folder / 'model_index.json'} is damaged (not a JSON object); {advice}")
    for component in sorted(k for k, v in index.items() if isinstance(v, list) and (folder / k).is_dir()):
        for config in sorted((folder / component).glob("*.json")):
            read_json(config, advice)
        for weights in sorted((folder / component).glob("*.safetensors")):
            problem = safetensors_problem(weights)
            if problem:
                raise DDPMError(f"{weights} is damaged ({problem}); {advice}")


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

    # LDMPipeline's type hint names VQModel; the AutoencoderKL it holds is what it decodes with.
    quiet = _DropMessages("Expected types for vqvae")
    diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils").addFilter(quiet)
    # No "Loading pipeline components..." bar in every command's output: loading takes a second.
    bar_was_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(source, revision=revision, use_safetensors=True)
    except Exception as err:
        raise _load_error(source, err) from None
    finally:
        diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils").removeFilter(quiet)
        if bar_was_on:
            diffusers_logging.enable_progress_bar()
    unet = pipe.unet.to(device).eval()
    vae = getattr(pipe, "vqvae", None)
    if vae is not None:
        vae = vae.requires_grad_(False).to(device).eval()  # on the UNet's device: decoding never mixes devices
    return LoadedModel(unet, dict(pipe.scheduler.config), vae, _read_train_config(source, revision), source)


def _load_error(source: str, err: Exception) -> DDPMError:
    message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
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
