"""The dataset registry: names, shapes, class counts, split sizes, the paper's attack budgets
and the files each needs.

Free of torch, so that validating and expanding a sweep stays light; the loaders are in
data.py. `check_available` only looks for files, and names the command that stages them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the project knows of a dataset, in one place: every other module reads it here."""

    name: str
    channels: int
    size: int  # images are size x size
    classes: int
    train_size: int  # samples in the full training split
    test_size: int  # samples in the full test split
    paper_eps: float  # the paper's L-inf budget
    cw_search_steps: int  # the paper's C&W binary-search steps
    paper_name: str | None  # the paper's name for it; None: not in the paper
    files: tuple[str, ...]  # relative to data_root; empty for embedded data


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        # scikit-learn's 1,797 8x8 digits resized to 28x28 and split 80/20 (data.py): a
        # stand-in for MNIST, with MNIST's attack budgets
        DatasetInfo(
            "digits",
            channels=1,
            size=28,
            classes=10,
            train_size=1437,
            test_size=360,
            paper_eps=32 / 255,
            cw_search_steps=10,
            paper_name=None,
            files=(),
        ),
        DatasetInfo(
            "mnist",
            channels=1,
            size=28,
            classes=10,
            train_size=60000,
            test_size=10000,
            paper_eps=32 / 255,
            cw_search_steps=10,
            paper_name="MNIST",
            files=tuple(
                f"MNIST/raw/{name}"
                for name in (
                    "train-images-idx3-ubyte",
                    "train-labels-idx1-ubyte",
                    "t10k-images-idx3-ubyte",
                    "t10k-labels-idx1-ubyte",
                )
            ),
        ),
        DatasetInfo(
            "cifar10",
            channels=3,
            size=32,
            classes=10,
            train_size=50000,
            test_size=10000,
            paper_eps=2 / 255,
            cw_search_steps=8,
            paper_name="CIFAR-10",
            files=tuple(
                f"cifar-10-batches-py/{name}"
                for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
            ),
        ),
        DatasetInfo(
            "organamnist",
            channels=1,
            size=28,
            classes=11,
            train_size=34561,
            test_size=17778,
            paper_eps=8 / 255,
            cw_search_steps=8,
            paper_name="OrganAMNIST",
            files=("organamnist.npz",),
        ),
    ]
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
