"""The command layer: what `ddpm-hf COMMAND` (and train_ddpm.py, sample_ddpm.py, ood_ddpm.py) run, above the library.

Each module turns a parsed `DDPMConfig` into library calls (the config is unpacked here, not
below), runs them and writes the reports. Library modules (`ddpm_hf/*.py`) never import this
package (tests/test_package.py checks it).

    cli.py      ddpm-hf: picks the command, hands it the rest of the command line
    train_cli.py, sample_cli.py (also fid, nll, inpaint), ood_cli.py, push.py, convert.py
                each command's flags and main(argv, prog); torch is imported after the flags are parsed
                (convert: its module imports torch, so its --help takes seconds)
    program.py  the name a command's usage line and examples show
    sample.py   sample_ddpm.py: a grid and PNGs, or a resumable --fid folder (+ FID/KID)
    nll.py      sample_ddpm.py --nll: bits/dim of a test split -> nll.json
    inpaint.py  sample_ddpm.py --inpaint: RePaint of test images -> PNGs, grid, inpaint.json
    ood.py      ood_ddpm.py: score two test sets, print the report, write the result files
"""
