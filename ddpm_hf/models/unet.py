"""The original's openai-style UNet expressed as a diffusers `UNet2DModel`.

The mapping (docs/original.md, "The model"): widths are `model_channels * mult`,
`attention_resolutions` are downsample factors (level i has attention when 2**i is
listed), the middle block always has attention, `num_head_channels` wins over
`num_heads`, and GroupNorm uses 32 groups everywhere, attention included.
"""

import torch
from diffusers import UNet2DModel

from ..config.sections import ModelSettings
from ..util.errors import UsageError

MIN_DECIDED_SIZE = 8  # an image folder's first image smaller than this is no size to train at


def _downsampling(model: ModelSettings) -> tuple:
    """(levels, total downsampling factor) of the UNet that --channel_mult describes."""
    levels = len(model.channel_mult)
    return levels, 2 ** (levels - 1)


def check_size_from_first_image(model: ModelSettings, size: int, first_image: str, dataset) -> None:
    """Without --size the first image of a folder decides the size: one that no UNet can train at
    (too small, or not divisible by its downsampling) blames that image and says which flag to give,
    instead of naming a --size that was never given."""
    levels, factor = _downsampling(model)
    smallest = max(MIN_DECIDED_SIZE, factor)
    if size < smallest:
        problem, suggestion = f"{size} px is too small to train at (at least {smallest})", max(32, factor)
    elif size % factor:
        problem = (
            f"{size} is not divisible by {factor}, the UNet's total downsampling with {levels} levels (--channel_mult)"
        )
        suggestion = -(-size // factor) * factor  # the next multiple
    else:
        return
    raise UsageError(
        f"the first image of {dataset} ({first_image}) decides the training size when --size is not given, and "
        f"{problem}; pass --size (e.g. --size {suggestion}; every image is resized to it), or remove that image"
    )


def unet_kwargs(model: ModelSettings, in_channels: int, sample_size: int) -> dict:
    levels, factor = _downsampling(model)
    if sample_size % factor:
        raise UsageError(
            f"--size {sample_size} is not divisible by {factor}, the UNet's total downsampling with "
            f"{levels} levels (--channel_mult); use a multiple of {factor}"
        )
    attention = [2**i in model.attention_resolutions for i in range(levels)]
    # Levels without attention get ResNet samplers with --resblock_updown; attention levels
    # take the sampler type from downsample_type/upsample_type.
    down_plain, up_plain = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if model.resblock_updown else ("DownBlock2D", "UpBlock2D")
    )
    head_dim = (
        model.num_head_channels
        if model.num_head_channels != -1
        else model.model_channels * model.channel_mult[0] // model.num_heads
    )
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(model.model_channels * m for m in model.channel_mult),
        layers_per_block=model.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else down_plain for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else up_plain for a in reversed(attention)),
        downsample_type="resnet" if model.resblock_updown else "conv",
        upsample_type="resnet" if model.resblock_updown else "conv",
        attention_head_dim=head_dim,
        norm_num_groups=32,
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        dropout=model.dropout,
        resnet_time_scale_shift="scale_shift" if model.use_scale_shift_norm else "default",
    )


def zero_init_like_original(unet: UNet2DModel) -> None:
    """The original zero-initialises each ResBlock's second conv, attention outputs and the final conv,
    so every residual branch starts as the identity."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("conv2") or name.endswith("to_out.0") or name == "conv_out":
                for p in module.parameters():
                    p.zero_()


def build_unet(model: ModelSettings, in_channels: int, sample_size: int) -> UNet2DModel:
    unet = UNet2DModel(**unet_kwargs(model, in_channels, sample_size))
    zero_init_like_original(unet)
    return unet


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
