"""`ddpm-hf convert`: an original GenerativeZoo .pt checkpoint into a diffusers pipeline folder. The
conversion and its flags are ddpm_hf/models/convert_gzoo.py's (also `python -m ddpm_hf.models.convert_gzoo`)."""

from ..models.convert_gzoo import main as convert_main
from .program import program_name


def main(argv=None, prog=None):
    return convert_main(argv, prog=program_name("convert", prog))


if __name__ == "__main__":
    main()
