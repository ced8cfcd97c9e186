"""The seed's UNet flags mapped onto diffusers UNet2DModel."""

import pytest
import torch

from ddpm_hf.config.sections import ModelSettings
from ddpm_hf.models.unet import build_unet, count_parameters, unet_kwargs
from ddpm_hf.util.errors import UsageError


def test_default_model_matches_the_original_parameter_count():
    assert count_parameters(build_unet(ModelSettings(), 1, 32)) == 6_469_889
    assert count_parameters(build_unet(ModelSettings(), 3, 32)) == 6_472_195


def test_attention_resolutions_are_downsample_factors():
    kw = unet_kwargs(ModelSettings(attention_resolutions=[2, 4]), 1, 32)
    assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert kw["up_block_types"] == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert kw["block_out_channels"] == (64, 128, 128) and kw["attention_head_dim"] == 32


def test_scale_shift_and_resblock_updown():
    cfg = ModelSettings(use_scale_shift_norm=True, resblock_updown=True)
    unet = build_unet(cfg, 1, 32)
    assert unet.config.resnet_time_scale_shift == "scale_shift"
    assert unet.config.down_block_types == ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D")
    # The middle block keeps its attention GroupNorm with scale-shift (attn_norm_num_groups=32).
    assert unet.mid_block.attentions[0].group_norm is not None


def test_zero_initialised_like_the_original():
    unet = build_unet(ModelSettings(model_channels=32, channel_mult=[1, 2]), 1, 16)
    assert unet.conv_out.weight.abs().sum() == 0
    assert all(r.conv2.weight.abs().sum() == 0 for b in unet.down_blocks for r in b.resnets)
    out = unet(torch.randn(2, 1, 16, 16), torch.tensor([0, 5])).sample
    assert out.shape == (2, 1, 16, 16) and out.abs().max() == 0
    assert unet.conv_in.weight.abs().sum() > 0


def test_size_must_divide_by_total_downsampling():
    with pytest.raises(UsageError, match="not divisible by 4"):
        build_unet(ModelSettings(), 1, 30)
