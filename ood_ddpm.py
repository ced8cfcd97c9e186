"""python ood_ddpm.py ...: the `ddpm-hf ood` command (ddpm_hf/commands/ood_cli.py), kept for existing
commands and configs."""

from ddpm_hf.commands import ood_cli
from ddpm_hf.commands.ood_cli import EXCLUDE, GROUPS, build  # noqa: F401  (read here by tests and benchmarks)
from ddpm_hf.util.errors import run_cli


@run_cli  # one-line errors; main.__wrapped__ raises them instead (the tests call it)
def main(argv):
    return ood_cli.main.__wrapped__(argv, prog="ood_ddpm.py")


if __name__ == "__main__":
    main()
