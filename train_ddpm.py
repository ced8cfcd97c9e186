"""python train_ddpm.py ...: the `ddpm-hf train` command (ddpm_hf/commands/train_cli.py), kept for
existing commands, configs and `accelerate launch train_ddpm.py`."""

from ddpm_hf.commands import train_cli
from ddpm_hf.commands.train_cli import GROUPS, build  # noqa: F401  (read here by tests and benchmarks)
from ddpm_hf.util.errors import run_cli


@run_cli  # one-line errors; main.__wrapped__ raises them instead (the tests call it)
def main(argv):
    return train_cli.main.__wrapped__(argv, prog="train_ddpm.py")


if __name__ == "__main__":
    main()
