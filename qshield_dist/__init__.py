"""qshield-dist: sweeps of adversarial-robustness trials on QShield hybrid networks.

The public API, for a script, a notebook or a Ray Tune driver (the CLI,
`python -m qshield_dist.launch`, is a shell over the same calls):

    load_config(path_or_dict, **overrides) -> SweepConfig   (api.py)
    run_sweep(config, executor=None)       -> SweepRun      (sweep.py: statuses, rows as Polars frames)
    summarize(run_or_dir, out=None)        -> Report        (api.py: verdicts, worst case, tables)
    run_until_decided(config, executor=None) -> [Look]      (decide.py: eval.until_decided's looks;
                                                             run_sweep runs one look, attack_size)
    evaluate(model, dataset=..., attacks=..., points=..., seeds=..., baseline="cnn") -> Report
                                            (evaluation.py: your nn.Module through a sweep of its own,
                                             judged against a built-in baseline)

Names are imported when first used, so that `import qshield_dist` stays cheap and the
torch-free paths (a dry run, --status, a summary) stay free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qshield_dist.api import Report, load_config, summarize
    from qshield_dist.config import ConfigError, SweepConfig
    from qshield_dist.decide import run_until_decided
    from qshield_dist.evaluation import evaluate
    from qshield_dist.summary.load import SummaryError
    from qshield_dist.sweep import SweepRun, run_sweep

_HOMES = {
    "load_config": "qshield_dist.api",
    "summarize": "qshield_dist.api",
    "evaluate": "qshield_dist.evaluation",
    "Report": "qshield_dist.api",
    "run_sweep": "qshield_dist.sweep",
    "run_until_decided": "qshield_dist.decide",
    "SweepRun": "qshield_dist.sweep",
    "SweepConfig": "qshield_dist.config",
    "ConfigError": "qshield_dist.config",
    "SummaryError": "qshield_dist.summary.load",
}
__all__ = [
    "ConfigError",
    "Report",
    "SummaryError",
    "SweepConfig",
    "SweepRun",
    "evaluate",
    "load_config",
    "run_sweep",
    "run_until_decided",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'qshield_dist' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
