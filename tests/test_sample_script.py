"""sample_ddpm.py: grid and PNGs; --fid folder naming and resumption."""

import numpy as np
import pytest
from conftest import run_script
from PIL import Image


def test_grid_and_one_png_per_image(trained_pipeline, tmp_path):
    out = tmp_path / "s"
    proc = run_script(
        "sample_ddpm.py",
        "--checkpoint",
        trained_pipeline,
        "--output_dir",
        out,
        "--num_samples",
        "5",
        "--batch_size",
        "2",
        "--sample_timesteps",
        "5",
        "--ddpm",
        "0",
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.png" for i in range(5)] + ["grid.png"])
    # The bar counts sampling steps (3 batches x 5 steps), not batches; diffusers' loading bar stays quiet.
    assert "15/15" in proc.stderr and "step" in proc.stderr, proc.stderr[-2000:]
    assert "Loading pipeline components" not in proc.stderr
    image = np.asarray(Image.open(out / "0.png"))
    assert image.shape == (16, 16) and image.dtype == np.uint8


@pytest.mark.slow
def test_fid_folder_naming_and_rerun_skips_written_images(trained_pipeline, tmp_path):
    args = [
        "--checkpoint",
        trained_pipeline,
        "--output_dir",
        tmp_path,
        "--fid",
        "--num_samples",
        "6",
        "--batch_size",
        "4",
        "--sample_timesteps",
        "5",
        "--ddpm",
        "0.5",
    ]
    run_script("sample_ddpm.py", *args)
    folder = tmp_path / "fid_samples" / "mnist5k" / "ddpm_0.5_timesteps_5_ep1"
    assert sorted(int(p.stem) for p in folder.glob("*.png")) == list(range(6))
    first = np.asarray(Image.open(folder / "5.png")).copy()
    (folder / "5.png").unlink()  # as if the run had stopped before writing it
    proc = run_script("sample_ddpm.py", *args)
    assert "wrote 2 new image(s) (4 already there)" in proc.stdout
    assert np.array_equal(np.asarray(Image.open(folder / "5.png")), first)  # same seed per batch: same image
