"""`python -m ddpm_hf COMMAND [flags]`: the `ddpm-hf` command (ddpm_hf/commands/cli.py)."""

from ddpm_hf.commands.cli import main

if __name__ == "__main__":
    main(prog="python -m ddpm_hf")
