"""The one model loader of every command and of the `.pt` converter's users: a pipeline folder, a Hub
model id or an original GenerativeZoo `.pt` file -> `LoadedModel` (pipeline.py; `.pt` files go
through convert_gzoo.py). Sits above both, so neither imports the other's caller."""

import os
from pathlib import Path
from typing import Optional

import torch

from ..util.errors import DDPMError, UsageError
from ..util.hub_access import check_hub_repo, hub_offline, is_hub_id
from .convert_gzoo import OriginalFlags, load_original_checkpoint
from .pipeline import LoadedModel, check_pipeline_folder, load_pipeline, refuse_weight_file


def require_hub_model(repo_id: str, revision: Optional[str], flag: str = "--checkpoint") -> None:
    """Fail in one line, in about a second, when a Hub model cannot be had (offline and not cached,
    unknown, or the Hub unreachable), instead of after retries and library warnings."""
    if hub_offline():
        import huggingface_hub

        try:
            huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
        except Exception:
            raise DDPMError(
                f"the Hub model {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading "
                f"it; download it once online, or pass a pipeline folder to {flag}"
            ) from None
        return
    check_hub_repo(
        repo_id,
        f"model {repo_id}",
        f"check {flag} (or log in for a private model)",
        f"pass a pipeline folder to {flag}",
        revision=revision,
    )


def load_model(
    checkpoint: Optional[str],
    original: Optional[OriginalFlags] = None,
    revision: Optional[str] = None,
    device="cpu",
    flag: str = "--checkpoint",
) -> LoadedModel:
    """A pipeline folder, a Hub model id or an original `.pt` file -> LoadedModel. `original` (the
    data, model, diffusion and latent flags) only describes a `.pt` file, which records none of them;
    `flag` names the option the model came from in error lines."""
    if not checkpoint:
        raise UsageError("--checkpoint is required: a trained pipeline folder, a Hub model id or an original .pt file")
    if checkpoint.endswith(".pt"):
        if not os.path.isfile(checkpoint):
            raise UsageError(f"checkpoint file {checkpoint} does not exist")
        return load_original_checkpoint(checkpoint, original, device=device)
    refuse_weight_file(checkpoint)
    if os.path.isdir(checkpoint):
        if not Path(checkpoint, "model_index.json").exists():
            hint = (
                " (a training checkpoint folder: use the output folder above checkpoints/)"
                if Path(checkpoint).parent.name == "checkpoints"
                else ""
            )
            raise UsageError(f"{checkpoint} is not a diffusers pipeline folder (no model_index.json){hint}")
        check_pipeline_folder(checkpoint)
    elif not is_hub_id(checkpoint):
        raise UsageError(
            f"{flag} {checkpoint} does not exist; pass a pipeline folder, a Hub model id (user/name) or a .pt file"
        )
    else:
        require_hub_model(checkpoint, revision, flag)
    return load_pipeline(checkpoint, revision, device)


def model_format(loaded: LoadedModel) -> tuple:
    """(channels, size) of the images the model takes (pixel space for latent models)."""
    from ..diffusion.latent import downsample_factor

    unet = loaded.unet
    if loaded.vae is None:
        return unet.config.in_channels, unet.config.sample_size
    return loaded.vae.config.in_channels, unet.config.sample_size * downsample_factor(loaded.vae)


def weights_hash(unet) -> str:
    """sha256 over the UNet's weights (names, dtypes, shapes and values in name order): the same for a
    model however it is stored (safetensors, .bin, an original .pt, a Hub snapshot), different for any
    other weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
