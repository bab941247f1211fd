"""`evaluate`: a model the user holds in memory, put through a sweep of its own (the same grid,
executor, run_trial, Parquet rows and summary as run_sweep) and judged against a built-in
baseline, as RobustBench's `benchmark(model)` does.

    import qshield_dist
    report = qshield_dist.evaluate(net)   # net: your nn.Module (logits, images in [0, 1])
    print(report.verdicts)
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from qshield_dist import code_snapshot
from qshield_dist.api import Report, load_config, summarize
from qshield_dist.config import ConfigError, SweepConfig, validate
from qshield_dist.datasets import DATASETS
from qshield_dist.fileio import atomic_write_bytes
from qshield_dist.grid import stable_hash
from qshield_dist.sweep import prepare, run_sweep

if TYPE_CHECKING:
    from torch import nn

    from qshield_dist.executors import Executor

log = logging.getLogger(__name__)

# The entry names of evaluate's sweep: its `compare:` judges MODEL against BASELINE.
MODEL, BASELINE = "model", "baseline"
# A quick start on `digits` on a CPU: FGSM and a 10-step PGD (its steps reach eps) on 64 points
# of one seed; the baseline trained 2 epochs at batch 32 (about 90 steps: the CNN reaches about
# 90% clean accuracy on digits; at the sweep's default batch of 128 it would need 5 epochs).
DEFAULT_ATTACKS: tuple[str | Mapping[str, Any], ...] = (
    "fgsm",
    {"name": "pgd", "preset": "standard", "params": {"steps": 10}},
)
DEFAULT_TRAIN: Mapping[str, Any] = {"epochs": 2, "batch_size": 32}
# What evaluate's own arguments set, which `sweep=` may not set again.
_OWN_KEYS = ("name", "results_dir", "seeds", "models", "attacks", "compare")
# Sweep keys that say where and how a sweep runs, not what it computes.
_WHERE_IT_RUNS = ("workers", "executor", "private", "checkpoint_dir", "ray", "slurm")
_EVALUATING = "QSHIELD_DIST_EVALUATING"  # set while evaluate runs, here and in its local workers
# The rebuilt module must compute the logits of the one passed (a CUDA module: within float error).
_REBUILD_RTOL, _REBUILD_ATOL = 1e-3, 1e-4


def evaluate(
    model: nn.Module,
    dataset: str = "digits",
    attacks: Sequence[str | Mapping[str, Any]] = DEFAULT_ATTACKS,
    points: int = 64,
    seeds: int | Sequence[int] = 0,
    baseline: str | Mapping[str, Any] | None = "cnn",
    *,
    kwargs: Mapping[str, Any] | None = None,
    stochastic: bool = False,
    differentiable_twin: Callable[[nn.Module], nn.Module] | None = None,
    results_dir: str | os.PathLike[str] | None = None,
    executor: Executor | None = None,
    sweep: Mapping[str, Any] | None = None,
) -> Report:
    """Put `model`, a module you hold, through the sweep machinery against a built-in baseline,
    as RobustBench's `benchmark(model)` does: the same grid, executor, run_trial, Parquet rows
    and summary as run_sweep, never a side path. Returns the summary's frames (Report; its `run`
    is the SweepRun, whose `config.model_dump()` is the sweep it ran, as a YAML would give it).

    The contract is `model: custom`'s (models/custom.py): `model` maps images in [0, 1], shaped
    (N, C, H, W) as the dataset's, to logits (N, classes). It is not trained: a trial rebuilds it
    as `type(model)(**kwargs)` from the source file of its class and loads its state_dict. So its
    class must be defined at the top level of a .py file of your own (not in a REPL or notebook
    cell, not inside a function, not an installed package's class), and whatever it computes
    must be in its class and its state_dict: before any trial runs, the rebuilt module is checked
    to compute the same logits as `model` on a random batch, else ValueError. A script that
    defines the class and calls evaluate must do so under `if __name__ == "__main__":`, as
    multiprocessing requires (a trial imports the script to find the class).

    Its sweep (the `compare:` judges `model` against `baseline`, by the project's paired verdict):
      - models: the custom entry, `factory: <class's file>.py:<Class>` (or `package.module:Class`
        for a class in a package) with `kwargs`, `stochastic`, `differentiable_twin` (a function
        at the top level of a file in the class's folder or package) and `weights:`, the
        state_dict saved as `torch.save(state_dict on the CPU, a BytesIO)` writes it, at
        RESULTS/code/weights/<sha256> (code_snapshot.py: where every custom model's weights are
        copied). Those bytes and the class's source tree are in the trial ids, as for `weights:`.
        Then `baseline`: a built-in model name ('cnn', 'cnn_small', 'dnn', 'hqcnn') or a model
        entry ({'model': 'cnn', 'train': {'method': 'pgd_at'}}), trained by the sweep on the same
        dataset and seeds; None: no baseline and no verdict, only the model's robustness.
      - data.dataset: `dataset`; eval.attack_size: `points` (per seed, shared by both models);
        seeds: `seeds`; attacks: `attacks`, each a name or an attack entry of a sweep file.
      - train: DEFAULT_TRAIN (the baseline's training; the model is loaded, never trained).
      - `sweep`: other sections of a sweep file (train, data, eval, resources, checkpoint_dir,
        executor, workers, private, ...), merged key by key over these; it may not set what the
        arguments set (name, results_dir, seeds, models, attacks, compare, data.dataset,
        eval.attack_size).

    Results go to `results_dir`, by default `results/evaluate-<digest>` under the working
    directory, where <digest> hashes what the sweep computes (results_name: the model's code and
    weights by their digests, never their paths; not the workers, executor or checkpoints):
    called again with the same model and arguments it runs nothing and returns the same report;
    any change to what it computes gives a directory of its own. Checkpoints go to the
    sweep's checkpoint_dir (`checkpoints`, shared by id). `executor`: run_sweep's (default the
    sweep's: local worker processes).

    Bad input raises before any trial runs: ValueError naming the argument (the model's class,
    kwargs), ConfigError naming the sweep key (as the launcher's). Nothing is written before the
    sweep is checked, but the weights file and the results directory that holds it."""
    import torch  # the model is a torch module: torch is here already

    if os.environ.get(_EVALUATING):
        raise RuntimeError(
            "evaluate() was called while evaluate() runs: the file that defines the model's class calls"
            " it when imported (a trial imports that file to rebuild the model); put the calls under"
            " `if __name__ == '__main__':`"
        )
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"model: got a {type(model).__name__}: must be a torch.nn.Module mapping images in [0, 1] to logits"
        )
    kwargs = dict(kwargs or {})
    cls = type(model)
    factory = _reference(cls, "model")
    twin = _reference(differentiable_twin, "differentiable_twin") if differentiable_twin else None
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise ValueError(
            f"kwargs: got {kwargs!r}: {cls.__name__}{inspect.signature(cls)} cannot be called with them ({exc});"
            f" evaluate rebuilds the model as {cls.__name__}(**kwargs) and loads its state_dict: pass the"
            " constructor's arguments as kwargs"
        ) from None
    weights = _state_bytes(model)
    sha = hashlib.sha256(weights).hexdigest()
    try:
        tree, _ = code_snapshot.source_trees(factory, twin)
    except code_snapshot.SourceError as exc:
        raise ValueError(f"model: its class {_where(cls)} ({factory}): {exc}") from None

    entry: dict[str, Any] = {"name": MODEL, "model": "custom", "factory": factory, "kwargs": kwargs}
    entry.update({"stochastic": True} if stochastic else {})
    entry.update({"differentiable_twin": twin} if twin else {})
    raw = _evaluation_sweep(entry, dataset, attacks, points, seeds, baseline, dict(sweep or {}))
    # The directory's digest: the sweep with the model's code and weights by digest, not by path.
    named = {**entry, "factory": code_snapshot.parse_ref(factory).name, "code": tree.digest, "weights": sha}
    named.update({"differentiable_twin": code_snapshot.parse_ref(twin).name} if twin else {})
    raw["name"] = results_name({**raw, "models": [named, *raw["models"][1:]]})
    results = Path(results_dir) if results_dir is not None else Path("results") / raw["name"]
    raw["results_dir"] = str(results)
    # Building the model for the checks (and trials run in this process) draw from torch's
    # global generator: the caller's stream is left as it was.
    with _evaluating(), torch.random.fork_rng(devices=[]):
        try:
            cfg = load_config(raw)  # every check but the weights file's, before it is written
            path = code_snapshot.weights_path(results, sha).resolve()
            if not (path.is_file() and code_snapshot.file_sha256(path) == sha):
                results.mkdir(parents=True, exist_ok=True, mode=0o700 if cfg.private else 0o755)
                atomic_write_bytes(path, weights, cfg.file_mode)
            raw["models"][0] = {**entry, "weights": str(path)}
            cfg = load_config(raw)
            grid = prepare(cfg)  # the launcher's checks: the class imports, builds, maps a batch to logits
        except ConfigError as exc:
            raise ConfigError(f"{exc}\n{_ARGUMENT_KEYS}") from None
        _check_rebuilt(model, cfg, stochastic)
        run = run_sweep(cfg, executor, grid=grid)
    return summarize(run)


def results_name(sweep: Mapping[str, Any]) -> str:
    """`evaluate-<digest>` of what the sweep computes: where and how it runs (_WHERE_IT_RUNS:
    workers, executor, cluster, file modes, checkpoints) never changes a number, so it is left
    out and the same evaluation finds its results whatever runs it."""
    return f"evaluate-{stable_hash({k: v for k, v in sweep.items() if k not in _WHERE_IT_RUNS})[:12]}"


# How evaluate's arguments are named in the sweep's messages.
_ARGUMENT_KEYS = (
    "(evaluate's arguments in the sweep: model -> models[0], baseline -> models[1], dataset -> data.dataset,"
    " points -> eval.attack_size, seeds -> seeds, attacks -> attacks, sweep -> the other keys)"
)


def _evaluation_sweep(
    entry: dict[str, Any],
    dataset: str,
    attacks: Sequence[str | Mapping[str, Any]],
    points: int,
    seeds: int | Sequence[int],
    baseline: str | Mapping[str, Any] | None,
    sweep: dict[str, Any],
) -> dict[str, Any]:
    """The sweep evaluate runs, as the dict a sweep YAML parses into (no name, no results_dir)."""
    given = sorted(set(sweep) & set(_OWN_KEYS))
    if given:
        raise ValueError(f"sweep: got key(s) {', '.join(given)}: evaluate's arguments set them")
    for section, key, argument in (("data", "dataset", "dataset"), ("eval", "attack_size", "points")):
        if not isinstance(sweep.get(section, {}), Mapping):
            raise ValueError(
                f"sweep.{section}: got {sweep[section]!r}: must be a mapping, as in a sweep file"
            )
        if key in sweep.get(section, {}):
            raise ValueError(f"sweep.{section}.{key}: evaluate's argument `{argument}` sets it")
    if isinstance(attacks, (str, Mapping)):
        attacks = [attacks]
    models = [entry]
    if baseline is not None:
        base = {"model": baseline} if isinstance(baseline, str) else dict(baseline)
        if base.get("model") == "custom":
            raise ValueError(
                f"baseline: got {baseline!r}: must be a built-in model (cnn, cnn_small, dnn, hqcnn)"
            )
        models.append({**base, "name": BASELINE})
    train = sweep.pop("train", {})
    if not isinstance(train, Mapping):
        raise ValueError(f"sweep.train: got {train!r}: must be a mapping, as in a sweep file")
    raw = {
        **sweep,
        "data": {"dataset": dataset, **sweep.get("data", {})},
        "eval": {"attack_size": points, **sweep.get("eval", {})},
        "train": {**DEFAULT_TRAIN, **train},
        "seeds": [seeds] if isinstance(seeds, int) else list(seeds),
        "models": models,
        "attacks": [{"name": a} if isinstance(a, str) else dict(a) for a in attacks],
    }
    if baseline is not None:
        raw["compare"] = [{"models": [MODEL], "against": [BASELINE]}]
    return raw


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _reference(obj: Any, key: str) -> str:
    """The factory reference of a class or function defined at the top level of a .py file:
    `path/to/file.py:name` (absolute), or `package.module:name` for a module of a package, whose
    snapshot then holds the package. ValueError naming `key` where it cannot be one."""
    where = _where(obj)
    qualname = getattr(obj, "__qualname__", "")
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise ValueError(f"{key}: got {obj!r}: must be a class or a function defined in a .py file")
    if "." in qualname or "<" in qualname:
        raise ValueError(
            f"{key}: {where} is defined inside a function or a class: a trial finds it by name in its"
            " file, so define it at the top level of a .py file"
        )
    try:
        file = inspect.getsourcefile(obj)
    except (TypeError, OSError):
        file = None
    if file is None or not file.endswith(".py") or not Path(file).is_file():
        raise ValueError(
            f"{key}: {where} has no source file (defined in a REPL, a notebook cell or by exec?): its source"
            " is what a trial imports and what its id hashes, so define it in a .py file and import it"
        )
    module = sys.modules.get(obj.__module__)
    if module is not None and getattr(module, obj.__name__, None) is not obj:
        raise ValueError(
            f"{key}: {where} is not what its module's name '{obj.__name__}' holds now (redefined or"
            " reloaded?): a trial would build that one"
        )
    path = Path(file).resolve()
    if "." in obj.__module__ and module is not None and getattr(module, "__package__", None):
        ref = f"{obj.__module__}:{obj.__name__}"  # in a package: its relative imports need the package
        try:
            tree = code_snapshot.source_tree(code_snapshot.parse_ref(ref))
        except code_snapshot.SourceError as exc:
            raise ValueError(f"{key}: {where}: {exc}") from None
        if not any(tree.root / rel == path for rel, _ in tree.files):
            raise ValueError(
                f"{key}: {where} is defined in {path}, but '{obj.__module__}' is found in {tree.root} from"
                " the working directory and sys.path: a trial would import another file"
            )
        return ref
    return f"{path}:{obj.__name__}"


def _state_bytes(model: nn.Module) -> bytes:
    """The model's state_dict on the CPU, as torch.save writes it into a BytesIO (the same bytes
    for the same tensors: the weights' id does not depend on a file name)."""
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _evaluating() -> Iterator[None]:
    """Mark this process (and the local workers it starts) as running evaluate."""
    os.environ[_EVALUATING] = "1"
    try:
        yield
    finally:
        os.environ.pop(_EVALUATING, None)


def _check_rebuilt(model: nn.Module, cfg: SweepConfig, stochastic: bool) -> None:
    """The module a trial builds (class from its file, kwargs, state_dict) computes the logits
    `model` does on a random batch of each dataset's shape; ValueError if not. A stochastic
    model is not checked (its draws differ): it is said in the log."""
    import torch

    from qshield_dist.models.custom import check_custom

    if stochastic:
        log.info("evaluate: a stochastic model: not checked that its rebuilt module computes what it does")
        return
    spec = validate(cfg).models[0].custom
    assert spec is not None
    modes = {m: m.training for m in model.modules()}
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    try:
        model.eval()
        for name in cfg.datasets:
            info = DATASETS[name]
            rebuilt = check_custom(spec, info).backbone
            x = torch.rand(
                (4, info.channels, info.size, info.size), generator=torch.Generator().manual_seed(0)
            )
            with torch.no_grad():
                theirs, ours = model(x.to(device)).float().cpu(), rebuilt(x).float()
            if theirs.shape != ours.shape or not torch.allclose(
                theirs, ours, rtol=_REBUILD_RTOL, atol=_REBUILD_ATOL
            ):
                diff = (theirs - ours).abs().max().item() if theirs.shape == ours.shape else "shapes differ"
                raise ValueError(
                    f"model: {_where(type(model))} rebuilt as a trial builds it ({spec.factory} with kwargs"
                    f" {spec.kwargs}, then its state_dict) computes other logits than the module passed (max"
                    f" |difference| {diff} on a random batch of {name}): its file changed since the class was"
                    " imported, or the module holds state outside its state_dict (set it in __init__ from"
                    " kwargs, or register it as a buffer)"
                )
    finally:
        for m, training in modes.items():
            m.train(training)
