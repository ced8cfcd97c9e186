"""Configuration: the seed's defaults, YAML + flag precedence, real booleans, clear errors."""

import subprocess
import sys

import pytest
from conftest import REPO

from ddpm_hf.config.options import DDPMConfig, build_parser, load_yaml
from ddpm_hf.config.parsing import parse_config
from ddpm_hf.config.sections import validate
from ddpm_hf.util.errors import UsageError

TRAIN_GROUPS = ("data", "model", "diffusion", "batch", "train", "output", "seed", "sampler", "samples")


def parse(argv):
    return parse_config(build_parser("t", "t", TRAIN_GROUPS), argv)[0]


def test_defaults_are_the_seed_documents():
    cfg = parse([])
    seed = dict(
        batch_size=128,
        n_epochs=100,
        lr=1e-3,
        timesteps=300,
        sample_timesteps=300,
        loss_type="huber",
        decay=1e-5,
        model_channels=64,
        num_res_blocks=2,
        attention_resolutions=[4],
        dropout=0.0,
        channel_mult=[1, 2, 2],
        conv_resample=True,
        dims=2,
        num_heads=4,
        num_head_channels=32,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        beta_start=1e-4,
        beta_end=0.02,
        sample_and_save_freq=5,
        dataset="mnist",
        ddpm=1.0,
        warmup=10,
        ema_rate=0.999,
        size=None,
        num_workers=0,
    )
    assert {k: getattr(cfg, k) for k in seed} == seed
    assert DDPMConfig().out_dataset == "fashionmnist" and DDPMConfig().recon_factor == 0.5


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("timesteps: 1000\nchannel_mult: [1, 2]\nlr: 1\nuse_scale_shift_norm: true\n")
    cfg = parse(["--config", str(path), "--lr", "0.5", "--no-use_scale_shift_norm"])
    assert cfg.timesteps == 1000 and cfg.channel_mult == [1, 2]
    assert cfg.lr == 0.5 and isinstance(cfg.lr, float)
    assert cfg.use_scale_shift_norm is False


def test_booleans_are_real():
    assert parse(["--use_scale_shift_norm"]).use_scale_shift_norm is True
    assert parse(["--no-use_scale_shift_norm"]).use_scale_shift_norm is False
    # The original's type=bool made `--flag False` true; here a value after the flag is refused.
    with pytest.raises(SystemExit) as err:
        parse(["--use_scale_shift_norm", "False"])
    assert err.value.code == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr_rate: 0.1\n", "unknown key(s) lr_rate"),
        ("timesteps: '300'\n", "'timesteps' must be int"),
        ("use_scale_shift_norm: 'False'\n", "'use_scale_shift_norm' must be bool"),
        ("channel_mult: [1, two]\n", "'channel_mult' must be int"),
        ("loss_type: mse\n", "'loss_type' must be one of huber, l2, l1"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_yaml(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dims=3), "2-D only"),
        (dict(model_channels=48), "32 GroupNorm groups"),
        (dict(sample_timesteps=301), "larger than --timesteps 300"),
        (dict(sample_timesteps=0), "positive"),
        (dict(batch_size=-1), "--batch_size must be a positive integer"),
        (dict(size=0), "--size must be a positive integer"),
        (dict(num_samples=0), "--num_samples must be a positive integer"),
        (dict(recon_factor=1.5), r"\(0, 1\]"),
        (dict(recon_factor=0.0), r"\(0, 1\]"),
        (dict(channel_mult=[2, 2]), "must start with 1"),
        (dict(attention_resolutions=[3]), "powers of two"),
        (dict(conv_resample=False), "conv_resample"),
    ],
)
def test_impossible_settings_are_refused(changes, message):
    with pytest.raises(UsageError, match=message):
        validate(DDPMConfig(**changes))


def test_command_line_errors_are_one_line_exit_2():
    proc = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), "--dims", "3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "2-D only" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_ddpm.py"), "--loss_type", "mse"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "invalid choice" in proc.stderr


def test_help_lists_flags_with_defaults():
    out = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), "--help"], capture_output=True, text=True).stdout
    for flag in (
        "--timesteps",
        "--sample_timesteps",
        "--loss_type",
        "--use_scale_shift_norm",
        "--no-use_scale_shift_norm",
        "--max_train_steps",
        "--gradient_accumulation_steps",
        "--mixed_precision",
        "--checkpointing_steps",
        "--checkpoints_total_limit",
        "--resume_from_checkpoint",
        "--report_to",
        "--no_wandb",
        "--output_dir",
        "--seed",
    ):
        assert flag in out
    assert "(default: 300)" in out and "(default: huber)" in out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path):
    values = load_yaml(path)
    cfg = DDPMConfig(**values)
    validate(cfg)
    if path.name not in ("quickstart.yaml", "mnist5k.yaml"):  # the family configs keep the seed's defaults
        assert (cfg.timesteps, cfg.sample_timesteps, cfg.loss_type, cfg.decay, cfg.lr) == (
            300,
            300,
            "huber",
            1e-5,
            1e-3,
        )


SCRIPTS = ("train_ddpm.py", "sample_ddpm.py", "ood_ddpm.py")


def script_help(script) -> str:
    """--help of a script, run in this interpreter as `python SCRIPT --help` would run it."""
    import contextlib
    import io
    import runpy

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / script), run_name="not_main")["main"](["--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def help_entries(text) -> dict:
    """{first option string: its whole help entry} of a --help text."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_reads_well(script):
    text = script_help(script)
    entries = help_entries(text)
    assert text.startswith(f"usage: {script} [--config FILE] [options]\n")
    # Group titles in words, not internal keys such as fid_metric.
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles and all("_" not in title for title in titles), titles
    for entry in entries.values():
        assert entry.count("(default:") <= 1, entry  # each default shown once
        assert "(default: None)" not in entry and "(default: [" not in entry, entry
    assert "--no-no_" not in text  # plain switches: --no_wandb only
    # The script's examples close the help.
    assert "\nexamples:\n" in text and f"  python {script}" in text.split("\nexamples:\n")[1]


def test_each_script_offers_only_flags_it_uses():
    train, sample, ood = (help_entries(script_help(s)) for s in SCRIPTS)
    for training_only in ("--streaming", "--shuffle_buffer_size", "--max_train_samples", "--num_workers"):
        assert training_only in train and training_only not in sample and training_only not in ood
    assert "--scheduler" in sample and "--scheduler" not in ood  # OOD reconstructs with DDIM (eta --ddpm)
    assert "--mixed_precision" in ood  # the scorer autocasts the UNet under it
    assert "(default: 300)" in train["--timesteps"] and "(default: off)" in train["--latent"]
    assert "(default: 1 2 2)" in train["--channel_mult"]


def test_switches_keep_their_names():
    assert parse(["--no_wandb"]).no_wandb is True
    assert parse(["--no-no_wandb"]).no_wandb is False  # still accepted, no longer shown


def test_scripts_parse_flags_before_importing_torch():
    """--help answers in well under 2 s: no torch, diffusers or accelerate before the flags are parsed."""
    code = (
        "import runpy, sys\n"
        "for script in ('train_ddpm.py', 'sample_ddpm.py', 'ood_ddpm.py'):\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "import ddpm_hf\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
