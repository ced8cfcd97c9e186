"""The decoded training images on disk (ddpm_hf/data/cache.py): reused across runs, rebuilt when the
source or the format changes or the file is damaged, built once by processes that start together,
never written through a planted link, and served in exactly the batches the in-memory tensor gives."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from conftest import REPO
from PIL import Image

from ddpm_hf.config.sections import DataSettings
from ddpm_hf.data import cache
from ddpm_hf.data.images import SplitSource, batch_loader, load_images
from ddpm_hf.util.errors import UsageError


def write_folder(folder, n, start=0):
    """n distinct 12x10 RGB PNGs (image i's pixels are all derived from i), so a pixel names its image."""
    folder.mkdir(exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "images", 40)


@pytest.fixture
def decodes(monkeypatch):
    """How many times a split was decoded (the cache's builder calls SplitSource.chunks once per build)."""
    calls = []
    real = SplitSource.chunks

    def counted(self, progress=True):
        calls.append((self.size, self.channels, len(self)))
        yield from real(self, progress)

    monkeypatch.setattr(SplitSource, "chunks", counted)
    return calls


def cached(folder, tmp_path, size=8, channels=3, **kw):
    data = DataSettings(dataset=str(folder), cache_dir=str(tmp_path / "cache"))
    return cache.cached_images(str(folder), "train", data, size, channels, progress=False, **kw)


def cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))


def the_file(tmp_path):
    (name,) = cache_files(tmp_path)
    return tmp_path / "cache" / name


def mapped_from(tensor) -> str:
    """The file whose mapping holds the tensor's data (/proc/self/maps), or ''."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else ""
    return ""


def in_memory(folder, size=8, channels=3):
    return load_images(str(folder), "train", DataSettings(dataset=str(folder)), size, channels, progress=False).images


def test_the_cache_holds_what_load_images_decodes_and_a_second_run_reuses_it(folder, tmp_path, decodes):
    first = cached(folder, tmp_path)
    path = the_file(tmp_path)
    written = path.stat().st_mtime_ns
    second = cached(folder, tmp_path)
    assert len(decodes) == 1  # the second run read the file, decoding nothing
    assert path.stat().st_mtime_ns == written
    assert torch.equal(first.images, in_memory(folder)) and torch.equal(second.images, first.images)
    assert first.images.shape == (40, 3, 8, 8) and first.images.dtype == torch.uint8
    assert mapped_from(second.images) == str(path)  # the file's pages, not a copy in memory


def test_a_new_size_or_channel_count_gets_its_own_file(folder, tmp_path, decodes):
    cached(folder, tmp_path)
    small, gray = cached(folder, tmp_path, size=4), cached(folder, tmp_path, channels=1)
    again = cached(folder, tmp_path, size=4)
    assert decodes == [(8, 3, 40), (4, 3, 40), (8, 1, 40)] and len(cache_files(tmp_path)) == 3  # each one reused
    assert torch.equal(small.images, in_memory(folder, size=4)) and torch.equal(again.images, small.images)
    assert torch.equal(gray.images, in_memory(folder, channels=1))


def test_a_changed_source_rebuilds_its_file(folder, tmp_path, decodes, caplog):
    cached(folder, tmp_path)
    write_folder(folder, 5, start=40)  # five more images
    grown = cached(folder, tmp_path)
    assert len(grown.images) == 45 and len(decodes) == 2
    assert len(cache_files(tmp_path)) == 1  # the file was replaced, not joined by a second one
    assert "the source changed" in caplog.text
    rewritten = folder / "003.png"  # same name and size, other pixels: the modification time tells
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(rewritten)
    os.utime(rewritten, ns=(10**18, 10**18))
    assert int(cached(folder, tmp_path).images[3].max()) == 0 and len(decodes) == 3


def test_max_train_samples_is_part_of_the_key(folder, tmp_path, decodes):
    assert len(cached(folder, tmp_path, limit=10).images) == 10
    assert len(cached(folder, tmp_path).images) == 40
    assert len(decodes) == 2


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: os.truncate(path, path.stat().st_size - 100), id="truncated"),
        pytest.param(lambda path: path.write_bytes(b"not a cache" * 100), id="bad-header"),
        pytest.param(lambda path: path.write_bytes(path.read_bytes() + b"x"), id="longer"),
    ],
)
def test_a_damaged_file_is_rebuilt_with_a_notice(folder, tmp_path, decodes, caplog, damage):
    cached(folder, tmp_path)
    damage(the_file(tmp_path))
    rebuilt = cached(folder, tmp_path)
    assert "is damaged" in caplog.text and len(decodes) == 2
    assert torch.equal(rebuilt.images, in_memory(folder))
    assert the_file(tmp_path).stat().st_size == cache.HEADER_BYTES + 40 * 3 * 8 * 8


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_planted_link_is_replaced_never_written_through(folder, tmp_path, caplog, kind):
    cached(folder, tmp_path)
    path = the_file(tmp_path)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    path.unlink()
    os.symlink(victim, path) if kind == "symlink" else os.link(victim, path)
    images = cached(folder, tmp_path).images
    assert victim.read_bytes() == b"precious"
    assert not path.is_symlink() and path.stat().st_nlink == 1 and path.stat().st_ino != victim.stat().st_ino
    assert torch.equal(images, in_memory(folder))
    assert "rebuilding it" in caplog.text


def test_a_stale_temporary_file_of_a_killed_build_is_removed(folder, tmp_path):
    cached(folder, tmp_path)
    path = the_file(tmp_path)
    stale = path.with_name(f".{path.name}.99999.tmp")
    stale.write_bytes(b"half")
    path.unlink()
    cached(folder, tmp_path)
    assert not stale.exists() and cache_files(tmp_path) == [path.name]


# Each child waits for the parent's signal, then builds with a decoder slowed down so the other one
# arrives while the first holds the lock.
BUILDER = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    from ddpm_hf.config.sections import DataSettings
    from ddpm_hf.data import cache
    from ddpm_hf.data.images import SplitSource

    folder, cache_dir, go = sys.argv[1:4]
    real = SplitSource.chunks
    def slow(self, progress=True):
        print("decoding", flush=True)
        time.sleep(2)
        yield from real(self, progress)
    SplitSource.chunks = slow
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.05)
    data = cache.cached_images(folder, "train", DataSettings(dataset=folder, cache_dir=cache_dir), 8, 3, progress=False)
    print("sha", hashlib.sha256(data.images.numpy().tobytes()).hexdigest(), flush=True)
    """
)


def test_two_processes_building_at_once_give_one_good_file(folder, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", BUILDER, str(folder), str(tmp_path / "cache"), str(go)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    lines = [out.split() for out, _ in outputs]
    assert sum("decoding" in words for words in lines) == 1  # one built the file, the other waited for it
    expected = __import__("hashlib").sha256(in_memory(folder).numpy().tobytes()).hexdigest()
    assert [words[-1] for words in lines] == [expected, expected]
    assert len(cache_files(tmp_path)) == 1  # no temporary file left beside it


def test_an_unusable_cache_dir_is_one_line_and_the_default_falls_back_to_memory(folder, tmp_path, caplog, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    data = DataSettings(dataset=str(folder), cache_dir=str(blocker / "cache"))
    with pytest.raises(UsageError, match=r"cannot keep the decoded images in --cache_dir .*choose a writable folder"):
        cache.cached_images(str(folder), "train", data, 8, 3, progress=False)
    monkeypatch.setattr(cache, "default_cache_dir", lambda: blocker / "cache")
    data = cache.cached_images(str(folder), "train", DataSettings(dataset=str(folder)), 8, 3, progress=False)
    assert torch.equal(data.images, in_memory(folder))
    assert "decoding them into memory instead" in caplog.text


def epochs_of_batches(images, epochs=3, skip_at=None):
    """The batches a prepared training loader serves over `epochs` epochs, as the Trainer draws them
    (set_epoch each epoch); `skip_at=(epoch, n)`: a run resumed there skips the n batches it had consumed."""
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    loader = accelerator.prepare(batch_loader(images, batch_size=7, seed=3))
    out = []
    first_epoch = skip_at[0] if skip_at else 0
    for epoch in range(first_epoch, epochs):
        loader.set_epoch(epoch)
        batches = loader
        if skip_at and epoch == first_epoch:
            batches = accelerator.skip_first_batches(loader, skip_at[1])
        out.extend(batch.clone() for (batch,) in batches)
    return out


def test_batches_are_bit_identical_to_the_in_memory_tensor_including_resume(folder, tmp_path):
    mapped, tensor = cached(folder, tmp_path).images, in_memory(folder)
    full = epochs_of_batches(tensor)
    assert len(full) == 18  # 6 batches (the last one of 5 images) x 3 epochs
    assert all(torch.equal(a, b) for a, b in zip(epochs_of_batches(mapped), full, strict=True))
    resumed = epochs_of_batches(mapped, skip_at=(1, 4))  # stopped after 4 batches of the second epoch
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[6 + 4 :], strict=True))
    assert not torch.equal(full[0], full[6])  # the epochs are shuffled differently
