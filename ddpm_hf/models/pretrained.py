"""Where a training run's UNet comes from besides the model flags: a trained pipeline
(`--pretrained_model_name_or_path`: ddpm-hf's, or a stock DDPMPipeline/DDIMPipeline such as
google/ddpm-cifar10-32; its UNet weights and its noise schedule are taken over) or a UNet config
(`--model_config_name_or_path`: diffusers' flag; fresh weights of that architecture)."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..util.errors import DDPMError, UsageError, first_line
from ..util.hub_access import is_hub_id
from .loader import load_model, require_hub_model

PRETRAINED_FLAG = "--pretrained_model_name_or_path"
CONFIG_FLAG = "--model_config_name_or_path"


@dataclass
class StartModel:
    unet: object  # diffusers UNet2DModel, in training mode
    scheduler_config: Optional[dict]  # the pretrained model's noise schedule; None: the diffusion flags decide
    source: str
    flag: str

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def size(self) -> int:
        return self.unet.config.sample_size


def load_pretrained(source: str, revision: Optional[str] = None) -> StartModel:
    """A pipeline folder or Hub id -> its UNet (full precision, trainable) and its scheduler config."""
    if source.endswith(".pt"):
        raise UsageError(
            f"{PRETRAINED_FLAG} takes a pipeline folder or a Hub model id; convert an original .pt file first "
            f"(ddpm-hf convert)"
        )
    loaded = load_model(source, revision=revision, flag=PRETRAINED_FLAG)
    if loaded.vae is not None:
        raise UsageError(f"{PRETRAINED_FLAG} {source} is a latent pipeline; fine-tuning one is not supported")
    unet = loaded.unet.float().train().requires_grad_(True)
    return StartModel(unet, dict(loaded.scheduler_config), source, PRETRAINED_FLAG)


def _config_folder(source: str) -> Optional[Path]:
    """The local folder holding the UNet's config.json (a config file's folder, a pipeline's unet/), or None."""
    path = Path(source)
    path = path.parent if path.is_file() else path
    if (path / "model_index.json").is_file():
        path = path / "unet"
    return path if path.is_dir() else None


def _read_unet_config(source: str, revision: Optional[str]) -> dict:
    from diffusers import UNet2DModel

    folder = _config_folder(source)
    if folder is None and not is_hub_id(source):
        raise UsageError(
            f"{CONFIG_FLAG} {source} does not exist; pass a UNet config (a folder holding config.json, or the "
            f"file), a pipeline folder or a Hub model id"
        )
    if folder is None:
        require_hub_model(source, revision, flag=CONFIG_FLAG)
    try:
        if folder is not None:
            return dict(UNet2DModel.load_config(str(folder)))
        try:  # a Hub pipeline's UNet, else a Hub repository of a UNet alone
            return dict(UNet2DModel.load_config(source, revision=revision, subfolder="unet"))
        except OSError:
            return dict(UNet2DModel.load_config(source, revision=revision))
    except (OSError, ValueError) as err:
        raise DDPMError(f"cannot read a UNet config from {CONFIG_FLAG} {source} ({first_line(err)})") from None


def unet_from_config(
    source: str, size: Optional[int], channels: Optional[int], revision: Optional[str] = None
) -> StartModel:
    """Fresh weights of the UNet a config describes, for `size` x `size` images of `channels`
    (None: the config's own; new weights fit any format the UNet can downsample)."""
    from diffusers import UNet2DModel

    config = _read_unet_config(source, revision)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if size:
        config["sample_size"] = size
    if channels:
        config["in_channels"] = config["out_channels"] = channels
    try:
        unet = UNet2DModel.from_config(config)
    except Exception as err:
        raise UsageError(f"{CONFIG_FLAG} {source} is no UNet2DModel config ({type(err).__name__}: {err})") from None
    return StartModel(unet.train(), None, source, CONFIG_FLAG)


def check_data_format(start: StartModel, size: Optional[int], channels: Optional[int]) -> None:
    """A pretrained UNet was trained on its own image format: --size/--channels that differ are refused."""
    if (size and size != start.size) or (channels and channels != start.channels):
        asked = f"{channels or start.channels}x{size or start.size}x{size or start.size}"
        raise UsageError(
            f"{start.flag} {start.source} was trained on {start.channels}x{start.size}x{start.size} images, "
            f"but --size/--channels ask for {asked}; drop them (the data is then resized to the model's format) "
            f"or pass --size {start.size} --channels {start.channels}"
        )


def describe(start: StartModel) -> str:
    what = "UNet and noise schedule" if start.scheduler_config is not None else "UNet architecture (new weights)"
    return f"{what} from {start.flag} {start.source}" + ("" if os.path.isdir(start.source) else " (Hub)")
