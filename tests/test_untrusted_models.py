"""What a model or dataset folder handed over by someone else may hold. Each case is one line on stderr
(no traceback), its exit code, nothing written; the rows are listed in docs/bad-inputs.md, section
"Untrusted models and data". The commands run in this process (their `main`, wrapped by run_cli) where
they fail before any work."""

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_unet

from ddpm_hf.config.sections import DataSettings
from ddpm_hf.util.errors import DDPMError

DOC = REPO / "docs" / "bad-inputs.md"


def one_line(capsys, call, *parts, code=1) -> str:
    """Run a command's main: exactly one `error:` line on stderr, exit `code`, no traceback."""
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("notice:", "host memory"))]
    assert exc.value.code == code, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def sample(*argv):
    from ddpm_hf.commands import sample_cli

    return lambda: sample_cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Path:
    from ddpm_hf.diffusion.sampling import make_noise_scheduler
    from ddpm_hf.models.pipeline import save_pipeline

    folder = tmp_path_factory.mktemp("untrusted_models") / "pipe"
    save_pipeline(folder, tiny_unet(), make_noise_scheduler(100, 1e-4, 0.02), {"dataset": "mnist5k"})
    return folder


def _edit_json(name, change):
    def edit(folder: Path):
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


def _pickled_unet(folder: Path):
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)


# ---- 1. valid JSON, values no command can use, in a model folder -----------------------------------------

MODEL_ROWS = {
    "scheduler T = 0": (
        _edit_json("scheduler/scheduler_config.json", lambda c: {**c, "num_train_timesteps": 0}),
        "scheduler/scheduler_config.json: num_train_timesteps must be a positive integer, got 0",
        1,
    ),
    "negative sample_size": (
        _edit_json("unet/config.json", lambda c: {**c, "sample_size": -8}),
        "unet/config.json: sample_size must be an integer from 1 to 4096 (pixels), got -8",
        1,
    ),
    "string sample_size": (
        _edit_json("unet/config.json", lambda c: {**c, "sample_size": "big"}),
        "sample_size must be an integer from 1 to 4096 (pixels), got 'big'",
        1,
    ),
    "absurd sample_size": (
        _edit_json("unet/config.json", lambda c: {**c, "sample_size": 100000}),
        "sample_size must be an integer from 1 to 4096 (pixels), got 100000",
        1,
    ),
    "beta_end 5": (
        _edit_json("scheduler/scheduler_config.json", lambda c: {**c, "beta_end": 5}),
        "beta_end must be a number between 0 and 1, got 5",
        1,
    ),
    "ddpm_hf_config.json a list": (
        _write("ddpm_hf_config.json", "[1, 2]"),
        "ddpm_hf_config.json is damaged (not a JSON object); re-save the pipeline",
        1,
    ),
    "unet/config.json a list": (
        _write("unet/config.json", "[1]"),
        "unet/config.json is damaged (not a JSON object)",
        1,
    ),
    "conditional UNet": (
        _edit_json("model_index.json", lambda c: {**c, "unet": ["diffusers", "UNet2DConditionModel"]}),
        "model_index.json names UNet2DConditionModel as the unet; the commands take a pipeline whose unet is an "
        "unconditional UNet2DModel",
        2,
    ),
    "autoencoder as unet": (
        _edit_json("model_index.json", lambda c: {**c, "unet": ["diffusers", "AutoencoderKL"]}),
        "model_index.json names AutoencoderKL as the unet",
        2,
    ),
    "pickled .bin weights only": (
        _pickled_unet,
        "unet holds its weights only as a pickle (diffusion_pytorch_model.bin), which is never loaded",
        1,
    ),
}


@pytest.mark.parametrize("case", list(MODEL_ROWS))
def test_bad_model_folder(case, pipe, tmp_path, capsys, monkeypatch):
    edit, message, code = MODEL_ROWS[case]
    folder = tmp_path / "pipe"
    shutil.copytree(pipe, folder)
    edit(folder)
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", folder, "--num_samples", "1", "--batch_size", "1", "--sample_timesteps", "2"]
    one_line(capsys, sample(*argv, "--output_dir", tmp_path / "samples"), message, code=code)
    assert not (tmp_path / "samples").exists()


def test_component_check_takes_a_good_model(pipe):
    from ddpm_hf.models.loader import load_model

    loaded = load_model(str(pipe))
    assert loaded.unet.config.sample_size == 8 and loaded.train_config["dataset"] == "mnist5k"


# ---- 2. damaged MedMNIST .npz files ----------------------------------------------------------------------


def _npz(path, **arrays):
    np.savez(path, **arrays)


NPZ_ROWS = {
    "not an archive": (lambda p: p.write_text("not an archive"), "is not a .npz (zip) archive"),
    "truncated archive": (
        lambda p: (_npz(p, x=np.zeros(100)), p.write_bytes(p.read_bytes()[:60])),
        "is not a .npz (zip) archive",
    ),
    "object arrays": (
        lambda p: _npz(p, train_images=np.array([object()] * 2, dtype=object), train_labels=np.zeros(2)),
        "holds object (pickled) arrays, which are never loaded",
    ),
    "no train_images": (
        lambda p: _npz(p, test_images=np.zeros((2, 4, 4), np.uint8), test_labels=np.zeros(2)),
        "has no train_images or train_labels (it holds: test_images, test_labels)",
    ),
    "float images": (
        lambda p: _npz(p, train_images=np.zeros((2, 4, 4), np.float32), train_labels=np.zeros(2)),
        "holds train_images of float32 (2, 4, 4) and 2 label(s), not uint8 (N, H, W[, C]) images",
    ),
}


@pytest.mark.parametrize("case", list(NPZ_ROWS))
def test_damaged_medmnist_file(case, tmp_path):
    from ddpm_hf.data.images import DataSettings, load_split

    make, message = NPZ_ROWS[case]
    make(tmp_path / "chestmnist.npz")
    with pytest.raises(DDPMError, match="^MedMNIST file .*chestmnist.npz ") as err:
        load_split("chestmnist", "train", DataSettings(medmnist_root=str(tmp_path)))
    assert message in str(err.value) and "delete " in str(err.value)


def test_intact_medmnist_file(tmp_path):
    from ddpm_hf.data.images import DataSettings, load_split

    _npz(tmp_path / "chestmnist.npz", train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.zeros((3, 14)))
    ds, column, _ = load_split("chestmnist", "train", DataSettings(medmnist_root=str(tmp_path)))
    assert len(ds) == 3 and column == "image"


# ---- 3. a --mask that is not an image, or a decompression bomb ---------------------------------------------


def _not_an_image(path):
    path.write_text("hello")


def _bomb(side):
    def make(path):
        from PIL import Image

        Image.new("1", (side, side)).save(path)  # a few kB of PNG, side x side pixels decoded

    return make


MASK_ROWS = {
    "not an image": (_not_an_image, "is not an image (UnidentifiedImageError); pass a PNG"),
    "10000 px bomb (PIL warns)": (_bomb(10000), "is 10000x10000 pixels, more than a mask may have (16,777,216 pixels"),
    "40000 px bomb (PIL refuses)": (_bomb(40000), "is larger than PIL decodes, more than a mask may have"),
}


@pytest.mark.parametrize("case", list(MASK_ROWS))
def test_bad_mask_file(case, tmp_path, capsys, monkeypatch):
    make, message = MASK_ROWS[case]
    make(tmp_path / "mask.png")
    monkeypatch.chdir(tmp_path)
    argv = ["--inpaint", "--checkpoint", "pipe", "--dataset", "mnist5k", "--mask", "mask.png", "--output_dir", "out"]
    one_line(capsys, sample(*argv), f"--mask mask.png {message}", code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


# ---- 4. memory: estimated before allocating; an out-of-memory error is one line -------------------------------


def test_sampling_batch_beyond_memory(pipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ddpm_hf.util.memory.available_memory", lambda device="cpu": 10**9)
    argv = ["--checkpoint", pipe, "--num_samples", "100000", "--batch_size", "100000", "--output_dir", tmp_path / "s"]
    one_line(
        capsys,
        sample(*argv),
        "error: sampling a batch of 100000 (1x8x8) needs about 4.1 GB of memory but 1.0 GB is available; "
        "lower --batch_size",
        code=2,
    )
    assert not (tmp_path / "s").exists()


def test_decoding_beyond_memory_names_the_size(tmp_path, monkeypatch):
    from ddpm_hf.data.images import DataSettings, load_images
    from ddpm_hf.util.errors import UsageError

    monkeypatch.setattr("ddpm_hf.util.memory.available_memory", lambda device="cpu": 10**6)
    with pytest.raises(
        UsageError, match=r"decoding 50 images of mnist5k at 1x4096x4096 needs about 1\.7 GB of memory but 1\.0 MB"
    ):
        load_images("mnist5k", "test", DataSettings(), size=4096, channels=1, limit=50)
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (2048, 1536)).save(folder / "a_big.png")
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"small_{i}.png")
    with pytest.raises(UsageError) as err:
        load_images(str(folder), "train", DataSettings())
    assert "the size follows the first image (" in str(err.value) and "a_big.png, 2048x1536): pass --size" in str(
        err.value
    )


@pytest.mark.parametrize(
    "error, expected",
    [
        (MemoryError(), "out of memory at --batch_size 512 (MemoryError); lower --batch_size"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes"),
            "at --batch_size 512",
        ),
    ],
)
def test_out_of_memory_is_one_line(error, expected, capsys):
    from ddpm_hf.util.errors import run_cli

    def main(argv):
        raise error

    one_line(capsys, lambda: run_cli(main)(["--batch_size", "512"]), expected, code=1)


def test_torch_out_of_memory_is_one_line(capsys):
    import torch

    from ddpm_hf.util.errors import run_cli

    def main(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    one_line(capsys, lambda: run_cli(main)([]), "out of memory at the default --batch_size (OutOfMemoryError)")


# ---- 5. an output path longer than the file system allows ------------------------------------------------------


@pytest.mark.parametrize("script", ["train", "sample", "ood"])
def test_output_path_too_long(script, pipe, tmp_path, capsys, monkeypatch):
    from ddpm_hf.commands import ood_cli, sample_cli, train_cli

    monkeypatch.chdir(tmp_path)
    long = "out/" + "x" * 300
    argv = {
        "train": (train_cli, ["--dataset", "mnist5k", "--no_wandb", "--max_train_steps", "1"]),
        "sample": (sample_cli, ["--checkpoint", pipe, "--num_samples", "1"]),
        "ood": (ood_cli, ["--checkpoint", pipe, "--dataset", "mnist5k", "--out_dataset", "animalmnist"]),
    }
    module, args = argv[script]
    one_line(
        capsys,
        lambda: module.main([*map(str, args), "--output_dir", long]),
        "--output_dir out/xxx",
        "has a name of 300 bytes (xxxxxxxxxxxxxxxxxxxxxxx…), over the 255 a name may have on this file system; "
        "choose a shorter --output_dir",
        code=2,
    )
    assert list(tmp_path.iterdir()) == []


def test_too_long_path_elsewhere_is_one_line(capsys):
    import errno
    import os

    from ddpm_hf.util.errors import run_cli

    def main(argv):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), "x" * 5000)

    one_line(capsys, lambda: run_cli(main)([]), "is longer than the file system allows; choose a shorter", code=2)


# ---- 8. a local folder means exactly the images in it -------------------------------------------------------


def _images(folder: Path, *names):
    from PIL import Image

    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 128).save(folder / name)


@pytest.mark.parametrize(
    "names, split, count",
    [
        (("a.png", "b.png", "train_x.png"), "train", 3),  # was 1: train_x.png alone was the train split
        (("a.png", "b.png", "test_x.png"), "train", 3),  # was KeyError 'train'
        (("a.png", "b.png", "test/t.png"), "test", 1),
        (("a.png", "b.png", "test/t.png"), "train", 2),
    ],
)
def test_folder_splits_ignore_file_names(names, split, count, tmp_path):
    from ddpm_hf.data.images import load_split

    _images(tmp_path / "data", *names)
    ds, _, _ = load_split(str(tmp_path / "data"), split, DataSettings())
    assert len(ds) == count


def test_output_dir_inside_the_dataset_is_not_data(tmp_path):
    from ddpm_hf.data.images import load_split

    _images(tmp_path / "data", "a.png", "b.png", "out/samples/epoch_0001.png")
    (tmp_path / "data" / "out" / "train_log.jsonl").write_text("{}\n")
    ds, _, _ = load_split(str(tmp_path / "data"), "train", DataSettings(), exclude=str(tmp_path / "data" / "out"))
    assert len(ds) == 2


def test_folder_of_no_images_says_so(tmp_path):
    from ddpm_hf.data.images import load_split
    from ddpm_hf.util.errors import UsageError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"holds no images \(1 other file\(s\): \.txt\); image files end in .*\.png"):
        load_split(str(tmp_path / "data"), "train", DataSettings())


# ---- 9. 32-bit float TIFFs and EXIF orientation ---------------------------------------------------------------


@pytest.mark.parametrize("values, expected", [((0.0, 0.5, 1.0), (0, 128, 255)), ((-2.0, 0.0, 2.0), (0, 128, 255))])
def test_float_tiff_is_scaled_not_black(values, expected, tmp_path):
    from PIL import Image

    from ddpm_hf.data.images import pil_to_array

    arr = np.array([list(values) * 2] * 6, np.float32)
    img = Image.fromarray(arr, "F")
    img.save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as back:
        out = pil_to_array(back, 1, 6)
    assert tuple(out[0, 0, :3]) == expected


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from ddpm_hf.data.images import pil_to_array

    img = Image.new("L", (8, 4), 0)
    img.paste(255, (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "r.jpg") as back:
        out = pil_to_array(back, 1, 4)
    assert out[0, 0, -1] > 200 and out[0, -1, 0] < 60  # upright: the white half on top (unrotated: on the left)


def test_config_that_is_a_folder_says_so(tmp_path, capsys):
    from ddpm_hf.commands import train_cli

    (tmp_path / "cfg").mkdir()
    call = partial(train_cli.main, ["--config", str(tmp_path / "cfg"), "--no_wandb"])
    one_line(capsys, call, f"config file {tmp_path / 'cfg'} is a folder; pass a YAML file to --config", code=2)


def test_resume_from_a_checkpoint_folder_without_a_step(tmp_path, capsys):
    """A copy of a valid checkpoint named checkpoint-best: the step is not in its name, so it is refused."""
    from ddpm_hf.commands import train_cli

    best = tmp_path / "out" / "checkpoints" / "checkpoint-best"
    best.mkdir(parents=True)
    (best / "model.safetensors").write_bytes(b"")
    argv = ["--dataset", "mnist5k", "--no_wandb", "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]
    call = partial(train_cli.main, [*argv, "--resume_from_checkpoint", str(best)])
    one_line(capsys, call, "a checkpoint folder is named checkpoint-N after its step N; rename it", code=2)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "checkpoint-best",
        "checkpoints",
        "model.safetensors",
    ]


# ---- 10. messages that name what is wrong: a tiny first image, a cache variable that is a file -------------


def _folder_with_first(tmp_path, first_size) -> Path:
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", first_size, 7).save(data / "a.png")  # sorted first: it decides the size
    for i in range(3):
        Image.new("L", (16, 16), 50 * i).save(data / f"b{i}.png")
    return data


def test_tiny_first_image_is_named_not_size(tmp_path):
    from conftest import TINY_MODEL, run_script

    data = _folder_with_first(tmp_path, (1, 1))
    model = [a for a in TINY_MODEL if a not in ("--size", "16")]
    argv = ["--dataset", data, *model, "--no_wandb", "--max_train_steps", "1", "--output_dir", tmp_path / "out"]
    proc = run_script("train_ddpm.py", *argv, check=False, env={"OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert proc.returncode == 2 and lines == [
        f"error: the first image of {data} (a.png, 1x1) decides the training size when --size is not given, and 1 px "
        "is too small to train at (at least 8); pass --size (e.g. --size 32; every image is resized to it), or "
        "remove that image"
    ], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "size, channel_mult, expected",
    [
        (
            15,
            (1, 2),
            "15 is not divisible by 2, the UNet's total downsampling with 2 levels (--channel_mult); "
            "pass --size (e.g. --size 16;",
        ),
        (4, (1, 2), "4 px is too small to train at (at least 8); pass --size (e.g. --size 32;"),
        (16, (1, 2, 2, 2, 2, 2), "16 px is too small to train at (at least 32); pass --size (e.g. --size 32;"),
    ],
)
def test_size_from_the_first_image_blames_the_image(size, channel_mult, expected):
    from ddpm_hf.config.sections import ModelSettings
    from ddpm_hf.models.unet import check_size_from_first_image
    from ddpm_hf.util.errors import UsageError

    cfg = ModelSettings(channel_mult=list(channel_mult))
    with pytest.raises(UsageError) as err:
        check_size_from_first_image(cfg, size, f"a.png, {size}x{size}", "data")
    assert str(err.value).startswith(f"the first image of data (a.png, {size}x{size}) decides the training size")
    assert expected in str(err.value)
    check_size_from_first_image(cfg, 32 if len(channel_mult) == 6 else 16, "a.png, 16x16", "data")  # a usable size


@pytest.mark.parametrize(
    "script, variable, plant",
    [
        ("train", "HF_HOME", "HF_HOME"),
        ("sample", "HF_HOME", "HF_HOME"),
        ("ood", "HF_HOME", "HF_HOME"),
        ("train", "HF_DATASETS_CACHE", "HF_DATASETS_CACHE"),
        ("train", "HF_HUB_CACHE", "HF_HOME/hub"),
    ],
)
def test_cache_variable_that_is_a_file_is_named(script, variable, plant, pipe, tmp_path, capsys, monkeypatch):
    from ddpm_hf.commands import ood_cli, sample_cli, train_cli

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    if plant == "HF_HOME/hub":
        blocker = home / "hub"
    else:
        blocker = tmp_path / "a_file"
        monkeypatch.setenv(plant, str(blocker))
    blocker.write_text("not a folder")
    out = ["--output_dir", str(tmp_path / "out")]
    mains = {
        "train": partial(train_cli.main, ["--dataset", str(tmp_path), "--no_wandb", *out]),
        "sample": partial(sample_cli.main, ["--checkpoint", str(pipe), *out]),
        "ood": partial(
            ood_cli.main, ["--checkpoint", str(pipe), "--dataset", "mnist5k", "--out_dataset", "fashionmnist", *out]
        ),
    }
    line = one_line(capsys, mains[script], code=2)
    if plant == "HF_HOME/hub":
        assert line == (
            f"error: {blocker} (the default of HF_HUB_CACHE, which is not set) is a file, not a folder; the Hugging "
            "Face caches are kept there: move that file away, or set HF_HUB_CACHE to a folder"
        )
    else:
        assert line == (
            f"error: {variable} {blocker} is a file, not a folder; the Hugging Face caches are kept there: point "
            f"{variable} at a folder, or unset it"
        )
    assert blocker.read_text() == "not a folder" and not (tmp_path / "out").exists()
