"""A command's flags (and its --config YAML) into a checked DDPMConfig: the one place where the flat flag
table (options.py) meets the sections' checks (sections.py)."""

import argparse

from .aliases import resolve_flags
from .options import FIELDS, DDPMConfig, load_yaml
from .sections import validate


def parse_config(parser, argv):
    """Return (DDPMConfig, namespace of the script's extra flags), every check run (sections.validate).
    Precedence: dataclass default < `--config FILE.yaml` < flags given on the command line."""
    args = vars(parser.parse_args(argv))
    values = load_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    args.pop("debug", None)
    args = resolve_flags(args)
    extra = {k: args.pop(k) for k in list(args) if k not in FIELDS}
    values.update(args)
    cfg = DDPMConfig(**values)
    # Scripts that load a model take T from it: --timesteps there only describes an original .pt file.
    takes_checkpoint = any(action.dest == "checkpoint" for action in parser._actions)
    validate(cfg, timesteps_known="timesteps" in values or not takes_checkpoint)
    return cfg, argparse.Namespace(**extra)
