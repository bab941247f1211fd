"""Dataset loaders for the registry in datasets.py: digits (embedded default), mnist,
cifar10, organamnist.

Every loader returns float32 images in [0, 1] shaped (N, C, H, W) and int64 labels, in host
memory (a trial moves them to its device once), from the library that owns the format
(scikit-learn, torchvision, medmnist). Nothing is ever
downloaded unless `download=True`; a missing file is an error that names the path expected
and the command that stages it.

    python -m qshield_dist.data fetch mnist --root data     # on a login node with internet
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qshield_dist.datasets import DATASETS, check_available

log = logging.getLogger(__name__)


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64


def _digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32, device="cpu").unsqueeze(1) / 16.0
    size = DATASETS["digits"].size
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(bunch.target, dtype=torch.int64, device="cpu")
    # A fixed 80/20 split: the digits set has no official one.
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y.numpy(), random_state=0
    )
    return Split(x[idx_train], y[idx_train]), Split(x[idx_test], y[idx_test])


def _mnist(root: Path, download: bool) -> tuple[Split, Split]:
    from torchvision.datasets import MNIST

    splits = []
    for train in (True, False):
        ds = MNIST(str(root), train=train, download=download)
        splits.append(Split(ds.data.unsqueeze(1).float() / 255.0, ds.targets.long()))
    return splits[0], splits[1]


def _cifar10(root: Path, download: bool) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10

    class _CIFAR10(CIFAR10):
        # torchvision checks the official archive's MD5s on every load (an MD5 of None
        # means "exists"); we let the unpickler reject a broken file instead, so batches in
        # the native format that were re-packed, or written by the tests, load too.
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    splits = []
    for train in (True, False):
        ds = _CIFAR10(str(root), train=train, download=download)
        x = torch.tensor(ds.data, device="cpu").permute(0, 3, 1, 2).float() / 255.0
        splits.append(Split(x, torch.tensor(ds.targets, dtype=torch.int64, device="cpu")))
    return splits[0], splits[1]


def _organamnist(root: Path, download: bool) -> tuple[Split, Split]:
    from medmnist import OrganAMNIST

    splits = []
    for split in ("train", "test"):
        ds = OrganAMNIST(split=split, root=str(root), download=download, size=28)
        x = torch.tensor(ds.imgs, device="cpu").float().unsqueeze(1) / 255.0
        splits.append(Split(x, torch.tensor(ds.labels, dtype=torch.int64, device="cpu").reshape(-1)))
    return splits[0], splits[1]


def stratified_indices(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """The sorted indices of a fixed-seed class-stratified subset of `size` samples (all of
    them when None)."""
    if size is None or size >= len(labels):
        return torch.arange(len(labels), device="cpu")
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(
        np.arange(len(labels)), train_size=size, stratify=labels.numpy(), random_state=seed
    )
    return torch.from_numpy(np.sort(idx))


def stratified_subset(split: Split, size: int | None, seed: int) -> Split:
    """A fixed-seed class-stratified subset of `size` samples (all of them when None)."""
    if size is None or size >= len(split.y):
        return split
    idx = stratified_indices(split.y, size, seed)
    return Split(split.x[idx], split.y[idx])


def load(
    name: str,
    data_root: str | Path = "data",
    train_size: int | None = None,
    test_size: int | None = None,
    download: bool = False,
    subset_seed: int = 0,
) -> tuple[Split, Split]:
    """(train, test) splits of a registered dataset, as float tensors in [0, 1]."""
    if name not in DATASETS:
        raise KeyError(f"dataset: got '{name}'; allowed: {', '.join(DATASETS)}")
    root = Path(data_root)
    check_available(name, root, download)
    if name == "digits":
        train, test = _digits()
    elif name == "mnist":
        train, test = _mnist(root, download)
    elif name == "cifar10":
        train, test = _cifar10(root, download)
    else:
        train, test = _organamnist(root, download)
    return stratified_subset(train, train_size, subset_seed), stratified_subset(test, test_size, subset_seed)


def fetch(name: str, root: str | Path) -> None:
    """Download a dataset into `root` (needs internet; for a login node)."""
    if name == "digits":
        log.info("digits ships with scikit-learn: nothing to fetch")
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    load(name, root, download=True)
    check_available(name, root)
    log.info("%s staged under %s", name, root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qshield_dist.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = sub.add_parser("fetch", help="download a dataset (needs internet)")
    fetch_cmd.add_argument("name", choices=[n for n in DATASETS if n != "digits"])
    fetch_cmd.add_argument("--root", default="data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    fetch(args.name, args.root)


if __name__ == "__main__":
    main()


def fixed_permutation(n_test: int, seed: int) -> torch.Tensor:
    """The test set's order for a seed, the same in every trial of that seed (on the host,
    whatever device a trial runs on: it indexes the row's per-point columns)."""
    return torch.randperm(n_test, generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu")


def pool_subset(test: Split, pool: int | None) -> tuple[Split, torch.Tensor]:
    """The evaluation pool of a test split, apart from any training subset: the whole split
    (pool None) or a fixed class-stratified subset of `pool` images; and each pool point's index
    in the split (what a row's `point_index` records)."""
    idx = stratified_indices(test.y, pool, 0)
    return Split(test.x[idx], test.y[idx]), idx


def shard_positions(pool_size: int, seed: int, shard: int, shard_size: int) -> torch.Tensor:
    """The pool positions of one shard of a seed's shared attack set: a consecutive slice of the
    seed's fixed permutation of the pool, in permutation order. It depends on nothing else (not
    on how many shards the sweep asks for), so every model of a dataset and seed answers on
    the same points, pair by pair, and a larger attack set only adds shards."""
    return fixed_permutation(pool_size, seed)[shard * shard_size : (shard + 1) * shard_size]
