"""Importing checkpoints of the original GenerativeZoo DDPM (openai-style UNet state dicts).

The fixture `gzoo_unet_a.*` was written by the original code with its own outputs: it
anchors the numerics. The variants (both qkv orders, scale-shift norm, resblock
up/down) are built here by `original_unet`, a functional re-statement of the openai
UNet forward that creates its parameters under the original key names on first use;
the fixture checks that this reference computes what the original computed.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from diffusers import DiffusionPipeline
from PIL import Image

from ddpm_hf.commands.common import original_flags
from ddpm_hf.commands.convert import main as convert_main
from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.diffusion.sampling import denoise, make_sampler, num_inference_steps
from ddpm_hf.models.convert_gzoo import load_original_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "gzoo_unet_a"
FIXTURE_FLAGS = json.loads(FIXTURE.with_suffix(".json").read_text())
MODEL_FLAGS = (
    "model_channels",
    "num_res_blocks",
    "attention_resolutions",
    "channel_mult",
    "num_heads",
    "num_head_channels",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "timesteps",
    "beta_start",
    "beta_end",
    "size",
)


def fixture_config(**changes) -> DDPMConfig:
    return DDPMConfig(**{k: FIXTURE_FLAGS[k] for k in MODEL_FLAGS}, channels=FIXTURE_FLAGS["in_channels"], **changes)


def cli_flags(cfg: DDPMConfig) -> list:
    flags = []
    for name in (*MODEL_FLAGS, "channels"):
        value = getattr(cfg, name)
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return flags


def run_module(module, *args):
    """`python -m module args` in a fresh interpreter (like conftest.run_script, for package modules)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=600,
        cwd=REPO,
    )


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---- the original UNet, restated functionally --------------------------------------------------


class original_unet:
    """forward(x, t) of the openai UNet as GenerativeZoo configures it, reading parameters from
    `state` by their original names and creating (random) ones that are missing."""

    def __init__(self, cfg: DDPMConfig, channels: int, state=None, seed=0):
        self.cfg, self.channels, self.state = cfg, channels, {} if state is None else state
        self.generator = torch.Generator().manual_seed(seed)

    def p(self, name, *shape, norm=False):
        if name not in self.state:
            if norm:  # GroupNorm affine: near 1 / near 0
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=self.generator)
            else:
                fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
                value = torch.randn(shape, generator=self.generator) / math.sqrt(fan_in)
            self.state[name] = value
        return self.state[name]

    def linear(self, name, x, n_in, n_out):
        return F.linear(x, self.p(f"{name}.weight", n_out, n_in), self.p(f"{name}.bias", n_out))

    def conv(self, name, x, n_in, n_out, k=3, stride=1):
        return F.conv2d(x, self.p(f"{name}.weight", n_out, n_in, k, k), self.p(f"{name}.bias", n_out), stride, k // 2)

    def norm(self, name, x):
        c = x.shape[1]
        return F.group_norm(x.float(), 32, self.p(f"{name}.weight", c, norm=True), self.p(f"{name}.bias", c, norm=True))

    def resblock(self, name, x, emb, n_out, up=False, down=False):
        n_in = x.shape[1]
        h = F.silu(self.norm(f"{name}.in_layers.0", x))
        if up:
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        elif down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv(f"{name}.in_layers.2", h, n_in, n_out)
        width = 2 * n_out if self.cfg.use_scale_shift_norm else n_out
        e = self.linear(f"{name}.emb_layers.1", F.silu(emb), emb.shape[1], width)[..., None, None]
        if self.cfg.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm(f"{name}.out_layers.0", h) * (1 + scale) + shift
        else:
            h = self.norm(f"{name}.out_layers.0", h + e)
        h = self.conv(f"{name}.out_layers.3", F.silu(h), n_out, n_out)
        skip = x if n_in == n_out else self.conv(f"{name}.skip_connection", x, n_in, n_out, k=1)
        return skip + h

    def attention(self, name, x):
        b, c, hh, ww = x.shape
        heads = c // self.cfg.num_head_channels if self.cfg.num_head_channels != -1 else self.cfg.num_heads
        ch = c // heads
        flat = x.reshape(b, c, -1)
        qkv = F.conv1d(
            self.norm(f"{name}.norm", flat),
            self.p(f"{name}.qkv.weight", 3 * c, c, 1),
            self.p(f"{name}.qkv.bias", 3 * c),
        )
        if self.cfg.use_new_attention_order:  # QKVAttention
            q, k, v = (part.reshape(b * heads, ch, -1) for part in qkv.chunk(3, dim=1))
        else:  # QKVAttentionLegacy
            q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        out = F.conv1d(a, self.p(f"{name}.proj_out.weight", c, c, 1), self.p(f"{name}.proj_out.bias", c))
        return (flat + out).reshape(b, c, hh, ww)

    @torch.no_grad()
    def __call__(self, x, t):
        cfg, mc = self.cfg, self.cfg.model_channels
        half = mc // 2
        args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        emb = self.linear("time_embed.2", F.silu(self.linear("time_embed.0", emb, mc, 4 * mc)), 4 * mc, 4 * mc)
        h = self.conv("input_blocks.0.0", x, self.channels, mc)
        skips, index, ds = [h], 1, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                h = self.resblock(f"input_blocks.{index}.0", h, emb, mult * mc)
                if ds in cfg.attention_resolutions:
                    h = self.attention(f"input_blocks.{index}.1", h)
                skips.append(h)
                index += 1
            if level != len(cfg.channel_mult) - 1:
                if cfg.resblock_updown:
                    h = self.resblock(f"input_blocks.{index}.0", h, emb, h.shape[1], down=True)
                else:
                    h = self.conv(f"input_blocks.{index}.0.op", h, h.shape[1], h.shape[1], stride=2)
                skips.append(h)
                index += 1
                ds *= 2
        h = self.resblock("middle_block.0", h, emb, h.shape[1])
        h = self.attention("middle_block.1", h)
        h = self.resblock("middle_block.2", h, emb, h.shape[1])
        index = 0
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                h = self.resblock(f"output_blocks.{index}.0", torch.cat([h, skips.pop()], dim=1), emb, mult * mc)
                position = 1
                if ds in cfg.attention_resolutions:
                    h = self.attention(f"output_blocks.{index}.1", h)
                    position = 2
                if level and i == cfg.num_res_blocks:
                    if cfg.resblock_updown:
                        h = self.resblock(f"output_blocks.{index}.{position}", h, emb, h.shape[1], up=True)
                    else:
                        h = F.interpolate(h, scale_factor=2, mode="nearest")
                        h = self.conv(f"output_blocks.{index}.{position}.conv", h, h.shape[1], h.shape[1])
                    ds //= 2
                index += 1
        return self.conv("out.2", F.silu(self.norm("out.0", h)), mc, self.channels)


# ---- the fixture written by the original code -------------------------------------------------


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURE.with_name(FIXTURE.name + "_expected.pt"), weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted by the command-line tool, loaded back with stock diffusers."""
    out = tmp_path_factory.mktemp("converted") / "pipeline"
    proc = run_module(
        "ddpm_hf.commands.convert",
        "--checkpoint",
        FIXTURE.with_suffix(".pt"),
        "--output_dir",
        out,
        *cli_flags(fixture_config()),
    )
    assert proc.returncode == 0 and "converted" in proc.stdout, proc.stderr
    return out


def test_reference_forward_matches_the_original_code(expected):
    """The functional restatement above computes what the original code computed (anchors the variant tests)."""
    state = torch.load(FIXTURE.with_suffix(".pt"), weights_only=True)
    reference = original_unet(fixture_config(), 1, dict(state))
    assert relative_error(reference(expected["x"], expected["t"]), expected["eps"]) < 1e-5
    assert set(reference.state) == set(state)  # it used every parameter and invented none


def test_converted_fixture_reproduces_eps_sample_and_recon(converted, expected):
    assert sorted(p.name for p in converted.iterdir()) == [
        "ddpm_hf_config.json",
        "model_index.json",
        "scheduler",
        "unet",
    ]
    pipe = DiffusionPipeline.from_pretrained(converted)
    unet, cfg = pipe.unet.eval(), fixture_config()
    assert sum(p.numel() for p in unet.parameters()) == FIXTURE_FLAGS["n_params"]
    assert pipe.scheduler.config.num_train_timesteps == FIXTURE_FLAGS["timesteps"] == 300
    with torch.no_grad():
        eps = unet(expected["x"], expected["t"]).sample
    assert relative_error(eps, expected["eps"]) < 1e-4

    sampler = make_sampler("ddim", pipe.scheduler.config)
    sampler.set_timesteps(num_inference_steps(cfg.timesteps, FIXTURE_FLAGS["sample_timesteps"]))
    sample = denoise(unet, sampler, expected["noise"], sampler.timesteps, eta=FIXTURE_FLAGS["ddpm"])
    assert relative_error(sample, expected["ddim_eta0_sample"]) < 1e-4

    t_start = int(expected["recon_t_start"])
    assert t_start == int(cfg.timesteps * FIXTURE_FLAGS["recon_factor"]) - 1
    recon = denoise(unet, sampler, expected["x_noisy"], sampler.timesteps[sampler.timesteps <= t_start], eta=0.0)
    assert relative_error(recon, expected["ddim_eta0_recon"]) < 1e-4
    # The stock DDIMPipeline of the converted folder samples as the library loop does.
    images = pipe(
        batch_size=2, num_inference_steps=10, eta=0.0, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    noise = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    ours = (denoise(unet, sampler, noise, sampler.timesteps, eta=0.0) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert images.shape == (2, 16, 16, 1) and relative_error(torch.from_numpy(images), ours) < 1e-5


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy_qkv", "new_qkv"])
@pytest.mark.parametrize(
    "scale_shift,updown",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["plain", "scale_shift", "resblock_updown", "scale_shift+updown"],
)
def test_variants_match_the_original_forward(tmp_path, new_order, scale_shift, updown):
    """Attention at both levels (so resblock up/down sits inside attention blocks too), 2 heads per width."""
    cfg = DDPMConfig(
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        num_head_channels=16,
        use_scale_shift_norm=scale_shift,
        resblock_updown=updown,
        use_new_attention_order=new_order,
        size=8,
        channels=3,
        timesteps=50,
    )
    reference = original_unet(cfg, 3, seed=1)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 41])
    eps = reference(x, t)
    path = tmp_path / "DDPM_cifar10_epoch7.pt"
    torch.save(reference.state, path)
    loaded = load_original_checkpoint(str(path), original_flags(cfg))
    with torch.no_grad():
        assert relative_error(loaded.unet(x, t).sample, eps) < 1e-5
    assert loaded.train_config["trained_epochs"] == 7 and loaded.scheduler_config["num_train_timesteps"] == 50
    if not new_order:  # the two qkv layouts differ, so the order flag matters for the weights
        swapped = load_original_checkpoint(
            str(path), original_flags(DDPMConfig(**{**cfg.to_dict(), "use_new_attention_order": True}))
        )
        with torch.no_grad():
            assert relative_error(swapped.unet(x, t).sample, eps) > 1e-3


def test_wrapped_keys_are_unwrapped(tmp_path, expected):
    """Files saved from a DDP-wrapped model carry `module.`; they convert the same."""
    state = torch.load(FIXTURE.with_suffix(".pt"), weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pt")
    loaded = load_original_checkpoint(str(tmp_path / "wrapped.pt"), original_flags(fixture_config()))
    with torch.no_grad():
        assert relative_error(loaded.unet(expected["x"], expected["t"]).sample, expected["eps"]) < 1e-4


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--model_channels", "64"], "time_embed.0.weight (128, 32) vs (256, 64)"),
        (["--num_res_blocks", "2"], "missing: input_blocks.2.0.in_layers.0.weight"),
        (["--use_scale_shift_norm"], "input_blocks.1.0.emb_layers.1.weight (32, 128) vs (64, 128)"),
        (["--channels", "3"], "input_blocks.0.0.weight (32, 1, 3, 3) vs (32, 3, 3, 3)"),
    ],
)
def cli_error(main, argv, capsys) -> tuple:
    """Run a command-line `main` in this process; return (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err.strip().splitlines()


def test_wrong_flags_give_one_line_naming_keys(tmp_path, capsys):
    for flags, named in (
        (["--model_channels", "64"], "time_embed.0.weight (128, 32) vs (256, 64)"),
        (["--num_res_blocks", "2"], "missing: input_blocks.2.0.in_layers.0.weight"),
        (["--use_scale_shift_norm"], "input_blocks.1.0.emb_layers.1.weight (32, 128) vs (64, 128)"),
        (["--channels", "3"], "input_blocks.0.0.weight (32, 1, 3, 3) vs (32, 3, 3, 3)"),
    ):
        code, lines = cli_error(
            convert_main,
            [
                "--checkpoint",
                FIXTURE.with_suffix(".pt"),
                "--output_dir",
                tmp_path / "out",
                *cli_flags(fixture_config()),
                *flags,
            ],
            capsys,
        )
        assert code == 2 and len(lines) == 1, lines
        assert "does not match the given model flags" in lines[0] and named in lines[0]
        assert "first conv has 32 channels and 1 input channel(s)" in lines[0]
        assert not (tmp_path / "out").exists()


def test_unreadable_files_give_one_line(tmp_path, capsys):
    import sample_ddpm

    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object: refused by weights_only
    torch.save({"step": 3}, tmp_path / "dict.pt")
    for name, message in (
        ("text.pt", "not a plain PyTorch state dict"),
        ("module.pt", "not a plain PyTorch state dict"),
        ("dict.pt", "not a state dict of the original UNet"),
        ("missing.pt", "does not exist"),
    ):
        code, lines = cli_error(
            sample_ddpm.main, ["--checkpoint", tmp_path / name, "--output_dir", tmp_path / "s"], capsys
        )
        assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_existing_output_is_not_overwritten(converted, capsys):
    before = (converted / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    code, lines = cli_error(
        convert_main,
        ["--checkpoint", FIXTURE.with_suffix(".pt"), "--output_dir", converted, *cli_flags(fixture_config())],
        capsys,
    )
    assert code == 2 and "already holds a pipeline" in lines[0]
    assert (converted / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_sample_ddpm_converts_pt_on_the_fly(tmp_path, converted):
    """sample_ddpm.py on the .pt gives the same images as on the converted folder."""
    common = ["--num_samples", "2", "--batch_size", "2", "--sample_timesteps", "10", "--ddpm", "0", "--seed", "3"]
    pt = tmp_path / "DDPM_mnist_epoch12.pt"
    shutil.copy(FIXTURE.with_suffix(".pt"), pt)
    import sample_ddpm

    sample_ddpm.main(
        ["--checkpoint", str(pt), *cli_flags(fixture_config()), *common, "--output_dir", str(tmp_path / "a")]
    )
    sample_ddpm.main(["--checkpoint", str(converted), *common, "--output_dir", str(tmp_path / "b")])
    for name in ("0.png", "1.png", "grid.png"):
        a, b = (torch.tensor(list(Image.open(tmp_path / d / name).getdata())) for d in ("a", "b"))
        assert torch.equal(a, b) and a.float().std() > 0
    assert Image.open(tmp_path / "a" / "0.png").size == (16, 16)


def test_latent_checkpoint_converts_to_an_ldm_pipeline(tmp_path, capsys):
    """A LatDDPM_ checkpoint: the UNet on the VAE's latents, saved with the VAE (here a tiny local one)."""
    from diffusers import AutoencoderKL

    AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
    ).save_pretrained(tmp_path / "vae")
    cfg = DDPMConfig(
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[2],
        num_head_channels=32,
        size=16,
        channels=1,
        latent=True,
        vae=str(tmp_path / "vae"),
    )
    reference = original_unet(cfg, 4, seed=3)  # the tiny VAE halves 16 px: 4x8x8 latents
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([5, 200])
    eps = reference(x, t)
    torch.save(reference.state, tmp_path / "LatDDPM_mnist_epoch3.pt")
    argv = ["--checkpoint", tmp_path / "LatDDPM_mnist_epoch3.pt", *cli_flags(cfg), "--vae", tmp_path / "vae"]
    code, lines = cli_error(convert_main, [*argv, "--output_dir", tmp_path / "plain", "--no-latent"], capsys)
    assert code == 2 and "4 inputs suggest a latent LatDDPM_ checkpoint: add --latent" in lines[0]
    convert_main([str(a) for a in argv + ["--latent", "--output_dir", tmp_path / "out"]])
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe).__name__ == "LDMPipeline" and (pipe.unet.config.in_channels, pipe.unet.config.sample_size) == (
        4,
        8,
    )
    with torch.no_grad():
        assert relative_error(pipe.unet(x, t).sample, eps) < 1e-5
    saved = json.loads((tmp_path / "out" / "ddpm_hf_config.json").read_text())
    assert (saved["channels"], saved["size"], saved["trained_epochs"]) == (1, 16, 3)
