"""Upload an existing output folder to the Hugging Face Hub (or retry a push that failed).

    ddpm-hf push outputs/quickstart --hub_model_id user/ddpm-mnist
    ddpm-hf push outputs/quickstart        # the --hub_model_id the run was trained with
    ddpm-hf push pretrained/ddpm-mnist5k --card_only   # write README.md, upload nothing
    python -m ddpm_hf.commands.push ...    # the same

The model card (README.md) is regenerated from the folder, with the metrics that OOD and
FID runs wrote into it since training.
"""

from pathlib import Path

from ..config.options import build_parser
from ..config.parsing import parse_config
from ..hub.upload import default_repo_id, push_output, write_model_card
from ..util.errors import first_line, run_cli
from ..util.logs import setup_logging
from .program import program_name


def _extra(parser):
    parser.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="A finished output folder (it holds model_index.json)."
    )
    parser.add_argument("--commit_message", help="Commit message on the Hub.")
    parser.add_argument(
        "--card_only",
        action="store_true",
        help="Write the model card to OUTPUT_DIR/README.md (for --hub_model_id) and upload nothing; no token needed.",
    )


@run_cli
def main(argv, prog=None):
    prog = program_name("push", prog)
    parser = build_parser(prog, first_line(__doc__), ("hub",), _extra, usage=f"{prog} OUTPUT_DIR [options]")
    cfg, extra = parse_config(parser, argv)
    setup_logging(cfg.log_level)
    out = Path(cfg.output_dir)
    if getattr(extra, "card_only", False):
        write_model_card(out, cfg.hub_model_id or default_repo_id(out), cfg.hub_license)
        return
    push_output(
        out,
        cfg.hub_model_id or default_repo_id(out),
        cfg.hub_token,
        cfg.hub_private_repo,
        cfg.hub_license,
        getattr(extra, "commit_message", None),
    )


if __name__ == "__main__":
    main(prog="python -m ddpm_hf.commands.push")
