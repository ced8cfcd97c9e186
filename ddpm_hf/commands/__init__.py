"""The command layer: what sample_ddpm.py and ood_ddpm.py run, above the library.

Each module turns a parsed `DDPMConfig` into library calls (the config is unpacked here, not
below), runs them and writes the reports. Library modules (`ddpm_hf/*.py`) never import this
package (tests/test_package.py checks it).

    sample.py   sample_ddpm.py: a grid and PNGs, or a resumable --fid folder (+ FID/KID)
    nll.py      sample_ddpm.py --nll: bits/dim of a test split -> nll.json
    inpaint.py  sample_ddpm.py --inpaint: RePaint of test images -> PNGs, grid, inpaint.json
    ood.py      ood_ddpm.py: score two test sets, print the report, write the result files
"""
