"""The real dataset loaders, fed with small files written in each native format."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from qshield_dist import data
from qshield_dist.datasets import DATASETS, DataMissingError


def _write_idx(path, array: np.ndarray) -> None:
    # IDX: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes.
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _labels(n: int, classes: int) -> np.ndarray:
    return np.arange(n) % classes


def test_mnist_loader_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    train_x = rng.integers(0, 256, (50, 28, 28))
    train_x[0, 0, 0] = 255
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", _labels(50, 10))
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte", _labels(20, 10))

    train, test = data.load("mnist", tmp_path)

    assert train.x.shape == (50, 1, 28, 28) and test.x.shape == (20, 1, 28, 28)
    assert train.x.dtype == torch.float32 and float(train.x.max()) == 1.0 and float(train.x.min()) >= 0.0
    assert torch.equal(train.y, torch.tensor(_labels(50, 10)))
    assert torch.allclose(train.x[3, 0], torch.tensor(train_x[3] / 255.0, dtype=torch.float32))


def test_cifar10_loader_reads_pickled_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in batches:
        x = rng.integers(0, 256, (10, 3 * 32 * 32), dtype=np.uint8)
        y = list(_labels(10, 10))
        written[name] = (x, y)
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "data": x, "labels": y}, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh, protocol=2)

    train, test = data.load("cifar10", tmp_path)

    assert train.x.shape == (50, 3, 32, 32) and test.x.shape == (10, 3, 32, 32)
    # channel-major rows -> (C, H, W) exactly as CIFAR-10 lays them out
    expected = torch.tensor(written["test_batch"][0][4].reshape(3, 32, 32) / 255.0, dtype=torch.float32)
    assert torch.allclose(test.x[4], expected)
    assert test.y.tolist() == written["test_batch"][1]


def test_organamnist_loader_reads_npz(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for split, n in (("train", 44), ("val", 11), ("test", 22)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = _labels(n, 11).reshape(-1, 1)
    np.savez(tmp_path / "organamnist.npz", **arrays)

    train, test = data.load("organamnist", tmp_path)

    assert train.x.shape == (44, 1, 28, 28) and test.x.shape == (22, 1, 28, 28)
    assert set(test.y.tolist()) == set(range(11))
    assert torch.allclose(test.x[5, 0], torch.tensor(arrays["test_images"][5] / 255.0, dtype=torch.float32))


def test_digits_is_embedded_real_data_resized():
    train, test = data.load("digits")
    assert train.x.shape[1:] == (1, 28, 28)
    assert len(train.y) + len(test.y) == 1797
    # what the registry says of it (the plan's estimates read the split sizes there)
    info = DATASETS["digits"]
    assert (len(train.y), len(test.y), info.classes) == (info.train_size, info.test_size, 10)
    assert train.x.shape[1:] == (info.channels, info.size, info.size)
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert torch.bincount(test.y).min() >= 30  # stratified 20% split


def test_subsets_are_stratified_and_fixed():
    a_train, a_test = data.load("digits", train_size=200, test_size=100)
    b_train, _ = data.load("digits", train_size=200, test_size=100)
    assert len(a_train.y) == 200 and len(a_test.y) == 100
    assert torch.equal(a_train.x, b_train.x)
    counts = torch.bincount(a_train.y, minlength=10)
    assert int(counts.max() - counts.min()) <= 2


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("organamnist", "organamnist.npz"),
    ],
)
def test_missing_files_name_the_path_and_the_fetch_command(tmp_path, name, expected):
    with pytest.raises(DataMissingError) as err:
        data.load(name, tmp_path)
    message = str(err.value)
    assert str(tmp_path / expected) in message
    assert f"python -m qshield_dist.data fetch {name} --root {tmp_path}" in message
