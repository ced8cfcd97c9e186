"""diffusers' flag names, from examples/unconditional_image_generation/train_unconditional.py, as
aliases of ours: a diffusers user's command line (and YAML keys of the same names) works unchanged.

An alias is not a second flag: `--help` lists them all on one "aliases" line, and a setting given
twice under different names with different values is refused in one line. diffusers flags that
mean nothing here are refused with the reason and what to use instead.
"""

import argparse
import textwrap

from ..util.errors import UsageError, short

# diffusers' name -> ours (the value is passed on unchanged).
RENAMED = {
    "dataset_name": "dataset",
    "train_data_dir": "dataset",
    "resolution": "size",
    "train_batch_size": "batch_size",
    "eval_batch_size": "num_samples",
    "dataloader_num_workers": "num_workers",
    "num_epochs": "n_epochs",
    "save_images_epochs": "sample_and_save_freq",
    "learning_rate": "lr",
    "adam_weight_decay": "decay",
    "ema_max_decay": "ema_rate",
    "logger": "report_to",
    "ddpm_num_steps": "timesteps",
    "ddpm_num_inference_steps": "sample_timesteps",
    "ddpm_beta_schedule": "beta_schedule",
}
# diffusers' switch -> (our setting, the value it sets). --use_ema is diffusers' EMAModel with its
# warm-up (use_ema_warmup=True); here an EMA is always kept, so the switch turns the warm-up on.
SWITCHES = {
    "use_ema": ("ema_warmup", True),
    "center_crop": ("crop", "center"),
    "random_crop": ("crop", "random"),
}
# Accepted and ignored: Accelerate reads the process's rank from the environment.
IGNORED = {"local_rank": int}
UNSUPPORTED = {
    "save_model_epochs": "the pipeline is saved at the end and resumable checkpoints every --checkpointing_steps "
    "optimiser steps; use --checkpointing_steps",
    "logging_dir": "tracker logs always go to OUTPUT_DIR/logs",
    "enable_xformers_memory_efficient_attention": "the UNet already uses PyTorch's scaled_dot_product_attention; "
    "drop the flag",
    "preserve_input_precision": "images are decoded to 8 bits per channel (16-bit grayscale scaled to 8 bits); "
    "drop the flag",
}
ALIAS_PREFIX = "alias:"


def _target(name: str) -> str:
    return RENAMED.get(name) or SWITCHES[name][0]


def aliases_line(offered) -> str:
    """The one help line naming every alias whose setting the script offers."""
    pairs = [f"--{a} = --{RENAMED[a]}" for a in RENAMED if RENAMED[a] in offered]
    pairs += [f"--{a} = --{f} {'' if v is True else v}".rstrip() for a, (f, v) in SWITCHES.items() if f in offered]
    pairs += [f"--{a} (ignored)" for a in IGNORED]
    # a pair is never split over two lines: its spaces are no-break spaces until the text is wrapped
    text = "diffusers' train_unconditional.py names, accepted as aliases: " + ", ".join(
        p.replace(" ", "\xa0") for p in pairs
    )
    return textwrap.fill(text + ".", width=96, break_on_hyphens=False).replace("\xa0", " ")


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        name = option_string.lstrip("-")
        parser.error(f"--{name} (a diffusers train_unconditional.py flag) has no equivalent here: {UNSUPPORTED[name]}")


def add_aliases(parser, offered, field_type) -> None:
    """Register the aliases of the settings in `offered` (hidden flags that store under 'alias:NAME';
    `field_type(name)` gives the argparse type and choices of one of our settings) and the line in --help."""
    group = parser.add_argument_group("aliases", aliases_line(offered))
    for alias, ours in RENAMED.items():
        if ours in offered:
            kind, choices = field_type(ours)
            group.add_argument(
                f"--{alias}", dest=ALIAS_PREFIX + alias, type=kind, choices=choices, help=argparse.SUPPRESS
            )
    for alias, (ours, _) in SWITCHES.items():
        if ours in offered:
            group.add_argument(f"--{alias}", dest=ALIAS_PREFIX + alias, action="store_true", help=argparse.SUPPRESS)
    for alias, kind in IGNORED.items():
        group.add_argument(f"--{alias}", dest=ALIAS_PREFIX + alias, type=kind, help=argparse.SUPPRESS)
    for alias in UNSUPPORTED:
        group.add_argument(f"--{alias}", nargs="?", action=_Unsupported, help=argparse.SUPPRESS)


def _switch_value(alias: str, on: bool):
    """What a switch sets: on, its value; off (YAML `center_crop: false`), the other crop, or no EMA warm-up."""
    value = SWITCHES[alias][1]
    if on:
        return value
    return False if isinstance(value, bool) else {"center": "random", "random": "center"}[value]


def _merge(values: dict, given: dict, source: str, shown) -> dict:
    """`values` (our names) plus `given` (alias -> value), each alias turned into our setting; a
    setting named twice with different values is refused."""
    out, named = dict(values), {k: k for k in values}
    for alias, value in given.items():
        if alias in IGNORED:
            continue
        if alias in UNSUPPORTED:
            raise UsageError(f"{source}: '{alias}' (a diffusers name) has no equivalent here: {UNSUPPORTED[alias]}")
        ours = _target(alias)
        if alias in SWITCHES:
            value = _switch_value(alias, value)
        if ours in out and out[ours] != value:
            raise UsageError(
                f"{source}: {shown(named[ours])} and {shown(alias)} set the same setting ({shown(ours)}) to "
                f"different values ({short(repr(out[ours]))} and {short(repr(value))}); pass only one of them"
            )
        out[ours], named[ours] = value, alias
    return out


def resolve_flags(args: dict) -> dict:
    """Parsed flags with the aliases given on the command line turned into our settings."""
    given = {k[len(ALIAS_PREFIX) :]: args.pop(k) for k in list(args) if k.startswith(ALIAS_PREFIX)}
    return _merge(args, given, "the command line", lambda name: f"--{name}")


def is_alias(key: str) -> bool:
    return key in RENAMED or key in SWITCHES or key in IGNORED or key in UNSUPPORTED


def resolve_yaml(data: dict, path) -> dict:
    """YAML keys with diffusers' names turned into ours (a key is a flag name without '--')."""
    given = {k: data[k] for k in data if is_alias(k)}
    ours = {k: v for k, v in data.items() if k not in given}
    for alias, value in given.items():
        if alias in SWITCHES and not isinstance(value, bool):
            raise UsageError(f"config file {path}: '{alias}' must be true or false, got {short(repr(value))}")
    return _merge(ours, given, f"config file {path}", lambda name: f"'{name}'")
