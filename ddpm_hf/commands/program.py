"""The name a command is shown under (its usage line and examples): `ddpm-hf train` through the
dispatcher, `ddpm-hf-train` as a console script, `train_ddpm.py` from the repository's scripts.
Imports nothing heavy: --help answers before torch is loaded."""

import os
import sys

from ..config.options import script_help


def invoked_name():
    """The console script this process runs (ddpm-hf, ddpm-hf-train, ...), else None."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("ddpm-hf") else None


def program_name(command: str, prog=None) -> str:
    """`prog` when the caller knows it (the dispatcher, the top-level scripts); else our console script
    as invoked (ddpm-hf-train); else `ddpm-hf COMMAND` (python -m, a call from Python)."""
    return prog or invoked_name() or f"ddpm-hf {command}"


def command_help(doc: str, command: str, prog: str) -> tuple:
    """(description, epilog) of a command's docstring, whose examples are written `ddpm-hf COMMAND ...`
    and `accelerate launch -m ddpm_hf COMMAND ...`, rewritten for the name it runs under."""
    description, epilog = script_help(doc)
    if epilog is None or prog == f"ddpm-hf {command}":
        return description, epilog
    if prog.endswith(".py"):  # a script file: `python train_ddpm.py`, `accelerate launch train_ddpm.py`
        epilog = epilog.replace(f"-m ddpm_hf {command}", prog).replace(f"ddpm-hf {command}", f"python {prog}")
    else:
        epilog = epilog.replace(f"ddpm-hf {command}", prog)
    return description, epilog
