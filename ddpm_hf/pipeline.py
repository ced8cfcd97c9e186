"""Saving a trained model as a standard diffusers pipeline folder, and loading one back.

A ddpm-hf output is `DDIMPipeline` (`model_index.json`, `unet/` with the EMA weights as
safetensors, `scheduler/` with T, betas and the original's DDIM settings) plus
`ddpm_hf_config.json`, the full training config. `DiffusionPipeline.from_pretrained`
loads it with no custom code. `load_model` also takes a Hub model id or an original
GenerativeZoo `.pt` checkpoint (converted on the fly).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import DDPMError, UsageError

CONFIG_NAME = "ddpm_hf_config.json"
SECRET_KEYS = ("hub_token",)


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
    Path(output_dir, CONFIG_NAME).write_text(json.dumps(public_config(train_config), indent=2, default=str))


def _read_train_config(source, revision) -> dict:
    path = Path(source, CONFIG_NAME)
    if not path.exists() and not os.path.isdir(source):
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, CONFIG_NAME, revision=revision))
        except Exception:
            return {}
    return json.loads(path.read_text()) if path.exists() else {}


def load_model(checkpoint: Optional[str], cfg=None, revision: Optional[str] = None, device="cpu") -> LoadedModel:
    """A pipeline folder, a Hub model id or an original `.pt` file -> LoadedModel."""
    if not checkpoint:
        raise UsageError("--checkpoint is required: a trained pipeline folder, a Hub model id or an original .pt file")
    if checkpoint.endswith(".pt"):
        if not os.path.isfile(checkpoint):
            raise UsageError(f"checkpoint file {checkpoint} does not exist")
        from .convert_gzoo import load_original_checkpoint

        return load_original_checkpoint(checkpoint, cfg, device=device)
    if os.path.isdir(checkpoint):
        if not Path(checkpoint, "model_index.json").exists():
            hint = " (a training checkpoint folder: use the output folder above checkpoints/)" if Path(checkpoint).parent.name == "checkpoints" else ""
            raise UsageError(f"{checkpoint} is not a diffusers pipeline folder (no model_index.json){hint}")
    elif checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
        raise UsageError(f"checkpoint {checkpoint} does not exist; pass a pipeline folder, a Hub model id (user/name) or a .pt file")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(checkpoint, revision=revision, use_safetensors=True)
    except Exception as err:
        message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        where = "folder" if os.path.isdir(checkpoint) else "Hub model"
        raise DDPMError(f"cannot load the pipeline {where} {checkpoint} ({type(err).__name__}: {message})") from None
    unet = pipe.unet.to(device).eval()
    vae = getattr(pipe, "vqvae", None)
    if vae is not None:
        vae = vae.to(device).eval()
    return LoadedModel(unet, dict(pipe.scheduler.config), vae, _read_train_config(checkpoint, revision), checkpoint)
