"""The row schema: every column a result row has, its Arrow type, and which columns are
volatile (where, when and how fast a trial ran). Rows become Arrow tables here only.
"""

from __future__ import annotations

import json
import platform
import typing
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterable

import pyarrow as pa

from qshield_dist.config import ModelSpec

# The columns below. A row of another schema version is not current: resume runs its trial
# again (its file is moved aside first) and the summary sets it aside.
# 3: checkpoint_sha256 (train rows) and inputs (diagnostic rows); 4: point_broken_by; 5: gpu_model;
# 6: trial_seconds; 7: train_method, train_config and custom (a custom model's identity); shard and
# point_clean_eval_wrong (attack rows)
SCHEMA_VERSION = 7


def _model_columns() -> list[tuple[str, pa.DataType]]:
    """ModelSpec's fields as (column, Arrow type): the one list of a model's settings."""
    columns = []
    for name, info in ModelSpec.model_fields.items():
        kinds = [a for a in (typing.get_args(info.annotation) or (info.annotation,)) if a is not type(None)]
        # Literal -> string; a custom model's settings (a BaseModel) -> the JSON of its identity
        arrow = {int: pa.int32(), float: pa.float64()}.get(kinds[0], pa.string())
        columns.append((name, arrow))
    return columns


MODEL_COLUMNS = tuple(name for name, _ in _model_columns())

# Column -> Arrow type. Every row has every column (missing values are null), so files
# from one schema version always concatenate.
SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("results_version", pa.int32()),  # the trial's current.STAGE_VERSIONS[stage], part of its id
        ("train_version", pa.int32()),  # the train version of the model the row used
        ("sweep", pa.string()),
        ("stage", pa.string()),  # train | attack | diagnostic
        ("trial_id", pa.string()),
        ("train_id", pa.string()),  # the train trial whose checkpoint this row used
        ("status", pa.string()),  # ok | failed
        ("error", pa.string()),
        ("dataset", pa.string()),
        # the resolved model spec, one column per ModelSpec field (model: the checkpoint's model;
        # backbone: the model itself for a classical one)
        *_model_columns(),
        ("train_method", pa.string()),  # standard | pgd_at | trades (train.method)
        (
            "train_config",
            pa.string(),
        ),  # JSON: the train settings that differ from their defaults (what the id hashes)
        ("control", pa.string()),  # null | backbone_only (the hybrid's backbone alone) | equal_budget
        (
            "variant_id",
            pa.string(),
        ),  # hash of what makes two trained models differ (not the seed), and the control
        ("variant", pa.string()),  # human-readable model variant label
        ("noise_approx", pa.string()),  # exact | pauli_twirl
        ("stochastic", pa.bool_()),
        ("attack", pa.string()),
        ("attack_preset", pa.string()),
        ("attack_params", pa.string()),  # JSON
        ("attack_config", pa.string()),  # JSON: what ran (version, components, EOT, majority repeats)
        ("threat_model", pa.string()),  # linf | l2 | l0 | none
        ("eps", pa.float64()),
        ("seed", pa.int32()),
        ("eval_repeats", pa.int32()),
        ("success_rule", pa.string()),
        ("n_test", pa.int32()),  # points the clean accuracy is measured on (attack rows: the shard's)
        ("clean_acc", pa.float64()),
        ("clean_acc_worst", pa.float64()),
        ("n_points", pa.int32()),  # the shard's points: the same test points for every model
        ("n_attacked", pa.int32()),  # its points the model classifies correctly clean (attacked)
        ("n_success", pa.int32()),
        ("asr", pa.float64()),
        ("asr_worst", pa.float64()),
        ("robust_acc", pa.float64()),
        ("attack_seconds", pa.float64()),
        ("forward_calls", pa.int64()),  # model invocations (batches)
        ("backward_calls", pa.int64()),
        ("forward_samples", pa.int64()),  # samples through the model, summed over calls
        ("backward_samples", pa.int64()),
        ("linf_max", pa.float64()),
        ("l2_mean", pa.float64()),
        ("budget_ok", pa.bool_()),
        ("diagnostic", pa.string()),
        ("diagnostic_value", pa.float64()),
        ("diagnostic_pass", pa.bool_()),
        ("details", pa.string()),  # JSON, free-form extra measurements
        ("shard", pa.int32()),  # attack rows: which slice of the seed's permutation of the pool
        # Per point of the row's shard, in permutation order, in the row itself so they are
        # written with it:
        ("point_index", pa.list_(pa.int32())),  # index in the dataset's whole test split
        ("point_correct", pa.list_(pa.bool_())),  # correct when clean (a majority of evaluations)
        ("point_broken", pa.list_(pa.bool_())),  # the attack succeeded (never for a clean-wrong point)
        # AutoAttack: the component that broke the point (apgd-ce, apgd-t, fab-t, square, ...)
        ("point_broken_by", pa.list_(pa.string())),
        ("point_eval_wrong", pa.list_(pa.list_(pa.bool_()))),  # stochastic models: each evaluation's outcome
        # stochastic models: each clean evaluation's outcome (wrong), whose majority is point_correct
        ("point_clean_eval_wrong", pa.list_(pa.list_(pa.bool_()))),
        ("train_seconds", pa.float64()),
        ("train_epochs", pa.int32()),
        ("train_steps", pa.int64()),
        # run_trial's wall time up to the write: data and checkpoint loading, training or the
        # clean evaluation, the attack or checks, the scoring (what SLURM packing and --plan expect)
        ("trial_seconds", pa.float64()),
        ("peak_rss_mb", pa.float64()),
        ("checkpoint_sha256", pa.string()),  # train rows: sha256 of the checkpoint file they describe
        ("inputs", pa.string()),  # diagnostic rows: JSON {attack trial id: status} of the rows it read
        ("threads", pa.int32()),  # intra-op threads the trial fixed for itself (part of its id)
        ("determinism", pa.string()),  # JSON: the numeric settings the trial ran under
        ("gpu_model", pa.string()),  # the GPU a CUDA trial ran on, as torch names it (null: CPU)
        ("executor", pa.string()),
        ("host", pa.string()),
        ("versions", pa.string()),  # JSON
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
COLUMNS = SCHEMA.names

# Columns that say where, when and how fast a trial ran. Every other column is a function of
# the trial's spec: the same trial id gives the same values on every executor and machine
# load (bit-identical on the same hardware and software). Tests compare rows without these.
VOLATILE_COLUMNS = (
    "sweep",
    "executor",
    "host",
    "versions",
    "created_at",
    "attack_seconds",
    "train_seconds",
    "trial_seconds",
    "peak_rss_mb",
    "checkpoint_sha256",  # the checkpoint also stores its training time, so its bytes vary
    "gpu_model",  # which GPU of the kind the trial id names (cpu or cuda)
)


@lru_cache(maxsize=1)
def package_versions() -> str:
    """The software a row was computed with, as JSON (a volatile column: the host's)."""
    found = {"python": platform.python_version()}
    for pkg in ("torch", "pennylane", "torchattacks", "qshield-dist"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return json.dumps(found, sort_keys=True)


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) -> Arrow table with exactly SCHEMA; unknown keys are an error."""
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(COLUMNS)
        if extra:
            raise KeyError(f"row has columns not in the results schema: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    columns["schema_version"] = [SCHEMA_VERSION] * len(rows)
    return pa.Table.from_pydict(columns, schema=SCHEMA)
