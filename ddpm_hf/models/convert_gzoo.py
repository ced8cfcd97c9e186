"""Import checkpoints of the original GenerativeZoo DDPM into diffusers' `UNet2DModel`.

An original checkpoint is a plain state dict of the EMA weights of the openai-style UNet
(`torch.save(ema.state_dict(), "DDPM_mnist_epoch100.pt")`). It records no flags: the
model and diffusion flags it was trained with rebuild the architecture, the image
channels and size follow `--dataset` / `--channels` / `--size` as in the original (no data
is loaded). The renaming (docs/original.md, "The model") is
derived from those flags block by block, so a wrong flag shows up as keys or shapes that
do not match, reported in one line.

    ddpm-hf convert --checkpoint DDPM_mnist_epoch100.pt --output_dir ddpm-mnist --timesteps 1000
"""

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config.sections import DataSettings, DiffusionSettings, LatentSettings, ModelSettings, flags_of
from ..diffusion.latent import latent_format, load_vae
from ..diffusion.sampling import make_noise_scheduler
from ..util.errors import DDPMError, UsageError, first_line
from ..util.logs import get_logger
from .pipeline import LoadedModel, public_config
from .unet import build_unet

logger = get_logger(__name__)

# ResBlock sub-modules: original name -> diffusers ResnetBlock2D name.
RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Wrappers that training tools put in front of every key (DDP, torch.compile).
KEY_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 4  # keys named per kind of mismatch in the one-line error


@dataclass
class OriginalFlags:
    """The flags an original checkpoint was trained with, which it does not record: the image format
    (data), the UNet (model), the noise schedule (diffusion) and --latent. `record`: every flag's value,
    saved with the converted model (default: these sections' flags)."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    latent: LatentSettings = field(default_factory=LatentSettings)
    record: Optional[dict] = None

    def recorded(self) -> dict:
        if self.record is not None:
            return self.record
        return flags_of(self.data, self.model, self.diffusion, self.latent)


def image_shape(data: DataSettings) -> tuple:
    """(channels, size) of the images, from the flags alone (the original read them from the dataset)."""
    from ..data.images import resolve_spec

    spec = resolve_spec(data.dataset)
    channels, size = data.channels or spec.channels, data.size or spec.size
    if not channels or not size:
        raise UsageError(
            f"--dataset {data.dataset} does not say the image channels and size without loading it; "
            f"pass --channels and --size as the checkpoint was trained with"
        )
    return channels, size


def block_layout(model: ModelSettings) -> list:
    """(original prefix, diffusers prefix, kind) of every parameterised block, in the original's order.
    kind is "plain" (same sub-keys), "res" (ResBlock) or "attn" (AttentionBlock)."""
    levels = len(model.channel_mult)
    attention = [2**i in model.attention_resolutions for i in range(levels)]
    updown = model.resblock_updown
    blocks = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
    ]
    index = 1
    for level in range(levels):
        for j in range(model.num_res_blocks):
            blocks.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if attention[level]:
                blocks.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            index += 1
        if level < levels - 1:  # Downsample's conv is `op`; with resblock_updown it is a ResBlock
            blocks.append(
                (
                    f"input_blocks.{index}.0" + ("" if updown else ".op"),
                    f"down_blocks.{level}.downsamplers.0" + ("" if updown else ".conv"),
                    "res" if updown else "plain",
                )
            )
            index += 1
    blocks += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(model.num_res_blocks + 1):
            blocks.append((f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", "res"))
            position = 1
            if attention[level]:
                blocks.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", "attn"))
                position = 2
            if level and j == model.num_res_blocks:  # the upsample closes the level, inside the last block
                blocks.append(
                    (
                        f"output_blocks.{index}.{position}" + ("" if updown else ".conv"),
                        f"up_blocks.{up}.upsamplers.0" + ("" if updown else ".conv"),
                        "res" if updown else "plain",
                    )
                )
            index += 1
    return blocks + [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]


def _expected_original(unet, layout) -> dict:
    """Original key -> shape that the flags imply (the inverse renaming of the UNet's own keys)."""
    shapes = {name: tuple(p.shape) for name, p in unet.state_dict().items()}
    expected = {}
    for orig, diff, kind in layout:
        for name, shape in shapes.items():
            if not name.startswith(diff + "."):
                continue
            suffix = name[len(diff) + 1 :]
            if kind == "plain":
                expected[f"{orig}.{suffix}"] = shape
                continue
            module, leaf = suffix.rsplit(".", 1)
            if kind == "res":
                module = {v: k for k, v in RESBLOCK.items()}[module]
            elif kind == "attn":
                if module in ("to_k", "to_v"):
                    continue  # folded into qkv
                module = {"group_norm": "norm", "to_q": "qkv", "to_out.0": "proj_out"}[module]
                if module == "qkv":
                    shape = (3 * shape[0], *shape[1:])
                if leaf == "weight" and module != "norm":
                    shape = (*shape, 1)  # 1x1 Conv1d in the original
            expected[f"{orig}.{module}.{leaf}"] = shape
    return expected


def _split_qkv(tensor: torch.Tensor, heads: int, new_order: bool) -> tuple:
    """The fused qkv (3C[, C]) -> q, k, v. Legacy order groups rows per head: [q_h0, k_h0, v_h0, q_h1, ...];
    the new order is [q_all, k_all, v_all] (each head-major, as diffusers splits heads)."""
    rest = tensor.shape[1:]
    channels = tensor.shape[0] // 3
    if new_order:
        parts = tensor.reshape(3, channels, *rest)
    else:
        parts = tensor.reshape(heads, 3, channels // heads, *rest).transpose(0, 1)
    return tuple(part.reshape(channels, *rest) for part in parts)


def check_keys(state_dict: dict, unet, flags: OriginalFlags, source: str) -> None:
    """One line naming what does not fit, or nothing."""
    expected = _expected_original(unet, block_layout(flags.model))
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape file vs flags", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}")
    hint = ""
    first = state_dict.get("input_blocks.0.0.weight")
    if first is not None and first.dim() == 4:
        hint = f" (its first conv has {first.shape[0]} channels and {first.shape[1]} input channel(s)"
        if first.shape[1] == 4 and not flags.latent.latent:
            hint += (
                "; 4 inputs suggest a latent LatDDPM_ checkpoint: add --latent (python -m "
                "ddpm-hf convert, sample_ddpm.py and ood_ddpm.py take it)"
            )
        hint += ")"
    raise UsageError(
        f"{source} does not match the given model flags ({'; '.join(parts)}); pass the flags it was "
        f"trained with{hint}: --model_channels, --channel_mult, --num_res_blocks, --attention_resolutions, "
        f"--use_scale_shift_norm, --resblock_updown, --dataset/--channels"
    )


def convert_state_dict(state_dict: dict, unet, flags: OriginalFlags, source: str = "the checkpoint") -> dict:
    """Original state dict -> `unet`'s state dict (checked first; raises UsageError on a mismatch)."""
    check_keys(state_dict, unet, flags, source)
    converted = {}
    for orig, diff, kind in block_layout(flags.model):
        for key, tensor in state_dict.items():
            if not key.startswith(orig + "."):
                continue
            suffix = key[len(orig) + 1 :]
            if kind == "plain":
                converted[f"{diff}.{suffix}"] = tensor
                continue
            module, leaf = suffix.rsplit(".", 1)
            if kind == "res":
                converted[f"{diff}.{RESBLOCK[module]}.{leaf}"] = tensor
            elif module == "norm":
                converted[f"{diff}.group_norm.{leaf}"] = tensor
            elif module == "proj_out":
                converted[f"{diff}.to_out.0.{leaf}"] = tensor.squeeze(-1) if leaf == "weight" else tensor
            else:  # qkv
                heads = unet.get_submodule(diff).heads
                flat = tensor.squeeze(-1) if leaf == "weight" else tensor
                parts = _split_qkv(flat, heads, flags.model.use_new_attention_order)
                for name, part in zip(("to_q", "to_k", "to_v"), parts):
                    converted[f"{diff}.{name}.{leaf}"] = part.contiguous()
    return converted


def read_state_dict(path) -> dict:
    """torch.load with weights_only (no code runs) onto the CPU (GPU-saved files load anywhere)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint file {path} does not exist") from None
    except pickle.UnpicklingError:
        raise UsageError(
            f"{path} is not a plain PyTorch state dict: weights_only loading refused it (it is not a "
            f"torch.save file, or it holds objects other than tensors)"
        ) from None
    except Exception as err:
        message = first_line(err)
        raise DDPMError(f"cannot read {path} as a PyTorch state dict ({type(err).__name__}: {message})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} is not a state dict of the original UNet (a dict of tensors, saved with torch.save)")
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return {k: v.float() for k, v in state.items()}


def epoch_in_name(name: str) -> Optional[int]:
    """N of the original's checkpoint names (..._epoch{N}.pt, ..._epoch_N), or None."""
    match = re.search(r"epoch_?(\d+)", name)
    return int(match.group(1)) if match else None


def load_original_checkpoint(path, flags: Optional[OriginalFlags] = None, device="cpu") -> LoadedModel:
    """An original `.pt` file -> LoadedModel (UNet2DModel, noise schedule, training flags)."""
    flags = flags or OriginalFlags()
    diffusion = flags.diffusion
    if diffusion.prediction_type != "epsilon" or diffusion.beta_schedule != "linear":
        raise UsageError(
            f"an original .pt checkpoint predicts the noise on linear betas; drop --prediction_type "
            f"{diffusion.prediction_type} / --beta_schedule {diffusion.beta_schedule} (they describe ddpm-hf "
            "training runs)"
        )
    state_dict = read_state_dict(path)
    channels, size = image_shape(flags.data)
    # --latent: the original's LatDDPM_ UNet works on the VAE's latents (4 channels at 1/8 size for sd-vae-ft-mse).
    vae = load_vae(flags.latent.vae, device) if flags.latent.latent else None
    unet_format = latent_format(flags.latent.vae, vae, channels, size, flags.model.channel_mult) if vae else None
    unet = build_unet(flags.model, *(unet_format or (channels, size)))
    unet.load_state_dict(convert_state_dict(state_dict, unet, flags, source=str(path)))
    scheduler = make_noise_scheduler(
        diffusion.timesteps, diffusion.beta_start, diffusion.beta_end, clip_sample=diffusion.clip_sample
    )
    train_config = {
        **public_config(flags.recorded()),
        "channels": channels,
        "size": size,
        "converted_from": Path(path).name,
    }
    epochs = epoch_in_name(Path(path).stem)
    if epochs is not None:
        train_config["trained_epochs"] = epochs
    return LoadedModel(unet.to(device).eval(), dict(scheduler.config), vae, train_config, str(path))
