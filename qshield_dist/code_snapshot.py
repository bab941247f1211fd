"""The user's own model code (`model: custom`): where it lives, what its ids hash, the snapshot
the launcher takes of it, and how a worker imports that snapshot. Free of torch.

A factory is `package.module:function` or `path/to/file.py:function`; a path is relative to
the working directory, as every path of a sweep file (data.data_root, results_dir). Its source
tree is what it may import of its own:

- a package: every .py file under the package's top-level folder (`mymodels/...`), imported
  with that folder's parent on sys.path;
- a file (or a top-level module of a single file): every .py file under the file's folder,
  which goes on sys.path itself (a helper next to it is imported as `import helper`).

The tree's digest (sha256 of each file's relative path and bytes, in sorted order) is part of
the train id. The launcher copies the tree to RESULTS/code/<digest>/ and the weights file to
RESULTS/code/weights/<sha256>: workers import and load those, never the live files, so editing
the code while a sweep runs cannot change what an id means, and an edit before a relaunch gives
new ids to exactly the trials that use the code. Only .py files are part of the tree, and never
a snapshot folder (one holding SNAPSHOT_MARK): results kept under the code's own folder
(`python my_script.py` writing ./results/...) would otherwise put the last snapshot into the
next digest, and every launch would get new ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator, Protocol

from qshield_dist.fileio import atomic_write_bytes, atomic_writer, read_bytes

SNAPSHOT_DIR = "code"  # under the results directory
SNAPSHOT_MARK = ".qshield-snapshot"  # an empty file in SNAPSHOT_DIR: a source tree skips the folder
WEIGHTS_DIR = "weights"  # under SNAPSHOT_DIR
MAX_FILES = 1000  # a factory next to a whole project's files: say so rather than hash them all
MAX_BYTES = 20 * 2**20


class SourceError(ValueError):
    """A factory reference or its source tree is unusable (config names the entry)."""


@dataclass(frozen=True)
class FactoryRef:
    """`module:function`, and the file it names if it was given as a path."""

    module: str
    function: str
    path: Path | None  # resolved, for `path/to/file.py:function`

    @property
    def name(self) -> str:
        """What an id hashes of it: the module as the snapshot imports it, never a path."""
        return f"{self.module}:{self.function}"


def parse_ref(text: str) -> FactoryRef:
    """`package.module:function` or `path/to/file.py:function` -> FactoryRef (nothing read)."""
    target, sep, function = text.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise SourceError("must be 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.stem.isidentifier():
            raise SourceError(f"the file's name '{path.name}' is not a Python module name")
        return FactoryRef(path.stem, function, path)
    if not all(part.isidentifier() for part in target.split(".")):
        raise SourceError(f"'{target}' is neither a dotted module name nor a path ending in .py")
    return FactoryRef(target, function, None)


@dataclass(frozen=True)
class SourceTree:
    """A factory's source tree: `root` goes on sys.path; `files` are (path relative to root, bytes)."""

    root: Path
    files: tuple[tuple[str, bytes], ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for rel, data in self.files:
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()[:16]

    @property
    def top_names(self) -> frozenset[str]:
        """The top-level module names the tree defines (what an import of it may shadow)."""
        return frozenset(rel.split("/")[0].removesuffix(".py") for rel, _ in self.files)


def _installed(path: Path) -> bool:
    """Is `path` inside the interpreter's own library folders (stdlib, site-packages)?"""
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.is_relative_to(root) for root in roots) or "site-packages" in path.parts


def source_tree(ref: FactoryRef) -> SourceTree:
    """Read the tree of `ref` (module names are found on the working directory, then sys.path)."""
    if ref.path is not None:
        if not ref.path.is_file():
            raise SourceError(f"no such file: {ref.path}")
        return _read(ref.path.parent, ref.path.parent)
    top = ref.module.split(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path])
    if spec is None:
        raise SourceError(f"no module named '{top}' in the working directory or on sys.path")
    if spec.submodule_search_locations:  # a package (a namespace package has no origin)
        folder = Path(next(iter(spec.submodule_search_locations))).resolve()
        root = folder.parent
    elif spec.origin and spec.origin.endswith(".py"):
        folder = root = Path(spec.origin).resolve().parent
    else:
        raise SourceError(f"'{top}' is not Python source ({spec.origin})")
    if _installed(folder):
        raise SourceError(
            f"'{top}' is an installed package ({folder}): a factory must be your own code; write a small"
            " factory file that imports it"
        )
    return _read(root, folder)


def source_trees(factory: str, twin: str | None) -> tuple[SourceTree, SourceTree | None]:
    """The source trees of a custom model's factory and of its twin (None without one)."""
    tree = source_tree(parse_ref(factory))
    return tree, source_tree(parse_ref(twin)) if twin is not None else None


def _read(root: Path, folder: Path) -> SourceTree:
    """Every .py file under `folder` (hidden files and folders, __pycache__ and snapshot folders
    left out), relative to `root`."""
    paths = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and d != "__pycache__" and not (Path(here) / d / SNAPSHOT_MARK).exists()
        ]
        paths += [Path(here) / n for n in names if n.endswith(".py") and not n.startswith(".")]
    paths.sort()
    if len(paths) > MAX_FILES:
        raise SourceError(
            f"{folder} holds {len(paths)} .py files (at most {MAX_FILES}): put the model's code in a folder"
            " or package of its own"
        )
    files = tuple((p.relative_to(root).as_posix(), read_bytes(p)) for p in paths)
    size = sum(len(data) for _, data in files)
    if size > MAX_BYTES:
        raise SourceError(
            f"{folder} holds {size / 2**20:.0f} MiB of .py files (at most {MAX_BYTES // 2**20})"
        )
    return SourceTree(root, files)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot_root(results_dir: str | Path) -> Path:
    return Path(results_dir) / SNAPSHOT_DIR


def weights_path(results_dir: str | Path, sha256: str) -> Path:
    return snapshot_root(results_dir) / WEIGHTS_DIR / sha256


def snapshot_names(folder: Path) -> frozenset[str]:
    """The top-level module names a snapshot folder defines (SourceTree.top_names, from its files)."""
    return frozenset(p.name.removesuffix(".py") for p in folder.iterdir() if not p.name.startswith("."))


def write_snapshot(tree: SourceTree, results_dir: str | Path, mode: int) -> Path:
    """Copy `tree` to RESULTS/code/<digest>/ (each file atomically; a file already there with
    the same bytes is kept, so a snapshot cut short by a crash is completed); returns the folder."""
    mark = snapshot_root(results_dir) / SNAPSHOT_MARK
    if not mark.is_file():  # first: no tree read from here on includes what follows
        atomic_write_bytes(mark, b"", mode)
    folder = snapshot_root(results_dir) / tree.digest
    for rel, data in tree.files:
        path = folder / rel
        if not (path.is_file() and path.read_bytes() == data):
            atomic_write_bytes(path, data, mode)
    return folder


def write_weights(source: Path, sha256: str, results_dir: str | Path, mode: int) -> Path:
    """Copy the weights file to RESULTS/code/weights/<sha256>; SourceError if its bytes are no
    longer those the ids were made with."""
    dest = weights_path(results_dir, sha256)
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    h = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open(source, "rb"))
        out = stack.enter_context(atomic_writer(dest, mode))
        for block in iter(lambda: src.read(2**20), b""):
            h.update(block)
            out.write(block)
        if h.hexdigest() != sha256:
            raise SourceError(f"{source} changed while the sweep was being launched: launch it again")
    return dest


class CustomCode(Protocol):
    """What a snapshot reads of a custom model's entry (config.CustomSpec, after validation)."""

    factory: str
    differentiable_twin: str | None
    code: str | None  # the source tree's digest, as validation read it
    weights: str | None
    weights_sha256: str | None


def take_snapshot(custom: CustomCode, results_dir: str | Path, mode: int) -> Path:
    """Copy a custom model's code and weights under `results_dir`, where its trials import and
    load them: the one place a snapshot is taken (the launcher for a sweep's results, the
    launcher's check and --plan's calibration for their own temporary folders). SourceError if
    the code or the weights changed since validation read them. Returns the code's folder."""
    tree, _ = source_trees(custom.factory, custom.differentiable_twin)
    if tree.digest != custom.code:
        raise SourceError(
            f"its code changed while the sweep was being launched ({tree.root}): launch it again"
        )
    folder = write_snapshot(tree, results_dir, mode)
    if custom.weights is not None and custom.weights_sha256 is not None:
        write_weights(Path(custom.weights), custom.weights_sha256, results_dir, mode)
    return folder


@contextlib.contextmanager
def imported(root: Path, names: frozenset[str], module: str) -> Iterator[ModuleType]:
    """`module` imported from `root`: for the block, `root` is first on sys.path and the
    modules named `names` (and their submodules) already imported are set aside, so a snapshot
    never meets another's modules of the same name; afterwards they are put back. No bytecode
    is written into `root`. Objects made in the block keep working after it (they hold their
    modules' globals)."""

    def ours(name: str) -> bool:
        return name.split(".")[0] in names

    saved = {name: mod for name, mod in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    entry, was = str(root), sys.dont_write_bytecode
    sys.path.insert(0, entry)
    sys.dont_write_bytecode = True
    importlib.invalidate_caches()
    try:
        yield importlib.import_module(module)
    finally:
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path.remove(entry)
        sys.dont_write_bytecode = was
