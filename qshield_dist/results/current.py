"""What is current: each stage's results version, why a stored row is stale, and when a stored
trial counts as done. The launcher's resume, --prune and the summary all ask here.
"""

from __future__ import annotations

from typing import Protocol

from qshield_dist.results.schema import SCHEMA_VERSION

# What each stage computes. A trial's id hashes its stage's version, so a bump re-runs that
# stage and everything after it (an attack id hashes its train id), never what comes before.
# Bump in the same commit as a change that alters what the stage computes, or a default that
# ids leave out (grid.py hashes only what differs from its default); tests/golden/ holds one
# golden trial per stage that fails when numbers move while the version does not.
TRAIN_VERSION = 3  # 3: canonical ids (numbers in one spelling, only what differs from its default)
# Attack 4: AutoAttack at its authors' strength; EOT only on stochastic models; the row's attack_config.
# 5: canonical ids (no diagnostic_size; eval_repeats only for stochastic models).
# 6: random starts drawn per point (attacks/streams.py), so a point's outcome does not depend on its
# batch; no attack stops on draws of a stochastic model; AutoAttack's rows record which component
# broke each point and its sanity checks.
# 7: shards (an attack trial covers one slice of a seed's permutation of the pool, in permutation
# order; its global draws seeded by its shard); the pool apart from data.test_size (eval.pool).
# 8: the clean evaluation on the shard's own points (seeded by seed and shard), not the pool.
ATTACK_VERSION = 8
# 5: canonical ids; 6: restart_sensitivity, selectable checks; reads attack version 6's rows;
# 7: the pool (eval.pool), restart_sensitivity on the first shard; reads attack version 7's rows
# 8: compares attacks over all their shards (join_shards); reads attack version 8's rows
# 9: two trials per model, the checks on its attack rows apart from those that attack the model;
# ids hash the checks run and restart_sensitivity's points, never attack_size or shard_size
DIAGNOSTIC_VERSION = 9
STAGE_VERSIONS = {"train": TRAIN_VERSION, "attack": ATTACK_VERSION, "diagnostic": DIAGNOSTIC_VERSION}

OUTSIDE_GRID = "not in this sweep's grid"
INPUTS_NOT_OK = "built on attack rows that were not all ok"
CHECKPOINT_MISSING = "its checkpoint is missing"
CHECKPOINT_DIFFERS = "its checkpoint is not the one its row describes (sha256 differs)"


def stale_reason(
    stage: str | None, schema_version: int | None, results_version: int | None, train_version: int | None
) -> str | None:
    """Why a stored row is not of the current versions, for a person; None when it is."""
    if schema_version != SCHEMA_VERSION:
        return f"schema version {schema_version if schema_version is not None else '?'} (current {SCHEMA_VERSION})"
    current = STAGE_VERSIONS.get(stage or "")
    if results_version != current:
        return f"{stage} version {results_version} (current {current})"
    if train_version != STAGE_VERSIONS["train"]:
        return f"built on a model of train version {train_version} (current {STAGE_VERSIONS['train']})"
    return None


class StoredRow(Protocol):
    """What the store knows of a trial's rows in one file, without opening it again."""

    stage: str
    status: str
    schema_version: int | None
    results_version: int | None
    train_version: int | None
    inputs_ok: bool | None


def not_done_reason(row: StoredRow, checkpoint: str | None) -> str | None:
    """Why a stored trial does not count as done (it runs again), or None when it does: rows
    of the current versions; a diagnostic built on attack rows that were all ok; a train row
    whose checkpoint is there and is the one it describes. `checkpoint` is the store's finding
    for a train row (CHECKPOINT_MISSING, CHECKPOINT_DIFFERS or None)."""
    reason = stale_reason(row.stage, row.schema_version, row.results_version, row.train_version)
    if reason is not None:
        return reason
    if row.stage == "diagnostic" and not row.inputs_ok:
        return INPUTS_NOT_OK
    if row.stage == "train" and row.status == "ok":
        return checkpoint
    return None
