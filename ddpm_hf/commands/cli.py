"""`ddpm-hf COMMAND [flags]`: one command for every run (also `python -m ddpm_hf`). The dispatcher only
picks the command; the rest of the command line goes to that command's own parser, so
`ddpm-hf train --help` lists the training flags alone. Each command is imported when it is chosen."""

import importlib
import sys

from .program import invoked_name

# name -> (module of ddpm_hf.commands, keyword arguments of its main, the one line of `ddpm-hf --help`)
COMMANDS = {
    "train": ("train_cli", {}, "Train an unconditional DDPM with Accelerate (several processes: accelerate launch)."),
    "sample": ("sample_cli", {}, "Sample a trained model: a grid and one PNG per image."),
    "fid": ("sample_cli", {"mode": "fid"}, "Sample a resumable folder for FID and score FID/KID against a reference."),
    "ood": ("ood_cli", {}, "Out-of-distribution scores on two test sets, or fit and apply a detector."),
    "nll": ("sample_cli", {"mode": "nll"}, "Bits/dim (the variational bound) of a dataset's test split."),
    "inpaint": ("sample_cli", {"mode": "inpaint"}, "Inpaint test images with RePaint."),
    "push": ("push", {}, "Upload an output folder to the Hugging Face Hub, or write its model card."),
    "convert": ("convert", {}, "Convert an original GenerativeZoo .pt checkpoint into a diffusers pipeline folder."),
}


def usage(prog: str) -> str:
    from .. import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} COMMAND [flags]   ({prog} COMMAND --help: the command's flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines + ["", f"ddpm-hf {__version__}; `python -m ddpm_hf` runs the same command."])


def main(argv=None, prog=None):
    """Run `COMMAND` with the rest of `argv`; exit 2 with one line for an unknown one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or invoked_name() or "ddpm-hf"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from .. import __version__

        print(f"ddpm-hf {__version__}")
        return
    if argv[0] not in COMMANDS:
        print(
            f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} (see {prog} --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    module, options, _ = COMMANDS[argv[0]]
    command = importlib.import_module(f"{__package__}.{module}")
    command.main(argv[1:], prog=f"{prog} {argv[0]}", **options)  # nothing returned: sys.exit(main()) exits 0


if __name__ == "__main__":
    main()
