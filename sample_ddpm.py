"""python sample_ddpm.py ...: the `ddpm-hf sample` command (ddpm_hf/commands/sample_cli.py; also its
--fid, --nll and --inpaint runs), kept for existing commands and configs."""

from ddpm_hf.commands import sample_cli
from ddpm_hf.commands.sample_cli import EXCLUDE, GROUPS, build  # noqa: F401  (read here by tests)
from ddpm_hf.util.errors import run_cli


@run_cli  # one-line errors; main.__wrapped__ raises them instead (the tests call it)
def main(argv):
    return sample_cli.main.__wrapped__(argv, prog="sample_ddpm.py")


if __name__ == "__main__":
    main()
