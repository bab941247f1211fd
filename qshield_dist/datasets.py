"""The dataset registry: names, image shapes, class counts and the files each needs.

Free of torch, so that validating and expanding a sweep stays light; the loaders are in
data.py. `check_available` only looks for files, and names the command that stages them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int
    classes: int
    files: tuple[str, ...]  # relative to data_root; empty for embedded data


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 28, 10, ()),
    "mnist": DatasetInfo(
        "mnist",
        1,
        28,
        10,
        tuple(
            f"MNIST/raw/{name}"
            for name in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        ),
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        3,
        32,
        10,
        tuple(
            f"cifar-10-batches-py/{name}"
            for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        ),
    ),
    "organamnist": DatasetInfo("organamnist", 1, 28, 11, ("organamnist.npz",)),
}


class DataMissingError(FileNotFoundError):
    """A dataset file is not where the sweep says it is."""


def check_available(name: str, root: str | Path, download: bool = False) -> None:
    """Raise DataMissingError naming the expected path and the staging command."""
    info = DATASETS[name]
    if download or not info.files:
        return
    root = Path(root)
    missing = [str(root / f) for f in info.files if not (root / f).exists()]
    if missing:
        raise DataMissingError(
            f"dataset '{name}': file not found: {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f". Stage it with: python -m qshield_dist.data fetch {name} --root {root}"
            " (on a machine with internet), or set data.download: true, or point data.data_root at it."
        )
