"""Verdicts from paired statistics on the shared attack set.

Every model of a dataset and seed answers on the same test points (data.shard_positions),
so two models can be compared point by point:

- A point is robust under a threat model when the model classifies it correctly clean and no
  attack of that threat model and budget broke it (the worst case over attacks, per point, as
  RobustBench and AutoAttack report). For a stochastic model "broke it" is the trial's rule:
  misclassified in a strict majority of one attack's evaluations; a minority of draws under
  several attacks never adds up to a break. Only L-inf attacks at one eps form such an
  ensemble; minimum-norm attacks (C&W, DeepFool: L2) and One-Pixel (L0) are reported beside it.
- A comparison of two variants uses the attacks both of them got, and only their common seeds;
  each side adds the attacks through a differentiable twin (BPDA) that only it got: they exist
  for a model whose gradient is hidden (a detached quantum branch), where they are the adaptive
  form of the plain attacks, which the other model already takes on its true gradient. Leaving
  them out would compare a masked model's weakest attacks with the other's strongest. The
  statistics are stats.py's: each comparison answers both questions ("these trained models":
  stratified by seed, McNemar; "the training procedure": seeds as the unit, t interval), the
  verdict rests on the one the report asks (`estimand`), Holm over the report's verdicts (and
  apart over its controls: verdicts.in_holm_family).
- The verdict comes from the interval (stats.verdict) and is provisional unless each side's
  worst case includes AutoAttack at its authors' strength in the form that side needs
  (attack_params.completes_worst_case: standard / rand, through BPDA for a detached branch);
  `lacks_a` / `lacks_b` name what is missing.

Scale: the per-point outcomes are never exploded into a row per point (at 10^6 attack rows of
256 points that table needed about 120 GB). load_points packs them (Points): one metadata row
per attack row, and all points end to end in two flat NumPy arrays, one byte of outcome bits
and one int32 slot (seed, point index) per point, built from the Arrow list columns' flat
values without a Python loop over rows or points. Worst cases and pairs are then scatters
over the slots of the rows a comparison uses, vectorized; only the per-seed pairs handed to
stats.py are NumPy arrays of one comparison.
"""

from __future__ import annotations

import json
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl
import pyarrow.compute as pc

from qshield_dist.attack_params import ATTACKS, completes_worst_case, needed_autoattack
from qshield_dist.summary import stats
from qshield_dist.summary.load import VARIANT_KEYS, Results, SummaryError, collect, scan
from qshield_dist.summary.verdicts import budget_train_config, holm_adjusted, verdict_kind
from qshield_dist.vocabulary import (
    BACKBONE_ALONE_VS_CNN,
    BACKBONE_ONLY,
    EQUAL_BUDGET,
    FIXED_RANDOMNESS,
    VS_BACKBONE_ALONE,
    VS_CNN,
    VS_EQUAL_BUDGET,
    VS_FIXED_RANDOMNESS,
    VS_NAMED,
)

POINT_COLUMNS = (
    *VARIANT_KEYS,
    "seed",
    "attack",
    "attack_preset",
    "attack_params",
    "threat_model",
    "eps",
    "stochastic",
    "point_index",
    "point_correct",
    "point_broken",
    "point_broken_by",
    "budget_ok",
    "shard",
)
_SHARDS = {"dataset": pl.String, "seed": pl.Int32, "shard": pl.Int32}
WORST_CASE = "linf"  # the threat model whose attacks form the per-point worst case
TWIN_ATTACKS = tuple(name for name, a in ATTACKS.items() if a.needs_twin)  # BPDA: hidden gradients only


@dataclass
class Points:
    """The per-point outcomes of the usable attack rows, packed: one metadata row per attack row
    (`rows`) and the points of all rows end to end in flat NumPy arrays, never one Python or
    Polars row per point. Row r's points are `slot[start:start + length]` and
    `code[start:start + length]`, in the row's own order (its `position`).

    - `rows`: vkey, dataset, seed, shard, attack, attack_label, threat_model, eps, stochastic,
      detached, completes (the run completes its model's worst case: an AutoAttack at the
      authors' strength), row (its number), start, length, n_ok (points correct clean and not
      broken).
    - `slot`: a point's place among the (seed, point index) pairs: `seed_base[i] + point_index`
      for the i-th of the sorted `seeds`, so that one slot is one point of one seed, whatever
      row, shard or model answered it (what the per-point joins were on).
    - `code`: bit 0 correct clean, bit 1 broken, bits 2-7 the AutoAttack component that broke it
      (1 + its index in `components`; 0: none named).
    """

    rows: pl.DataFrame
    slot: np.ndarray
    code: np.ndarray
    seeds: np.ndarray
    seed_base: np.ndarray
    components: list[str]

    @property
    def height(self) -> int:
        """Attack rows with points."""
        return self.rows.height

    @property
    def n_slots(self) -> int:
        return int(self.seed_base[-1])

    def entries(self, rows: pl.DataFrame) -> np.ndarray:
        """The flat positions of the points of `rows` (a subset of self.rows), row by row."""
        return _ranges(rows["start"].to_numpy(), rows["length"].to_numpy())

    @cached_property
    def starts(self) -> np.ndarray:
        """Each row's first flat position (increasing with the row number)."""
        return self.rows["start"].to_numpy()

    @cached_property
    def shards(self) -> np.ndarray:
        """Each row's shard; -1 for none (sorts first, as a null shard did)."""
        return self.rows["shard"].fill_null(-1).to_numpy()

    def seed_of_slot(self, slots: np.ndarray) -> np.ndarray:
        """The index (into `seeds`) of each slot's seed."""
        return np.searchsorted(self.seed_base, slots, side="right") - 1


_CORRECT, _BROKEN, _OK_MASK = 1, 2, 3  # code bits; (code & 3) == 1: correct and not broken
_MAX_COMPONENTS = 63  # what bits 2-7 of a code can name
_ROWS_SCHEMA = {
    "vkey": pl.String,
    "dataset": pl.String,
    "seed": pl.Int32,
    "shard": pl.Int32,
    "attack": pl.String,
    "attack_label": pl.String,
    "threat_model": pl.String,
    "eps": pl.Float64,
    "stochastic": pl.Boolean,
    "detached": pl.Boolean,
    "completes": pl.Boolean,
    "row": pl.Int64,
    "start": pl.Int64,
    "length": pl.Int64,
    "n_ok": pl.Int64,
}


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(start, start + length) over the given rows, vectorized."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    shift = starts.astype(np.int64) - (np.cumsum(lengths) - lengths)
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


def _empty_points() -> Points:
    return Points(
        rows=pl.DataFrame(schema=_ROWS_SCHEMA),
        slot=np.zeros(0, dtype=np.int64),
        code=np.zeros(0, dtype=np.uint8),
        seeds=np.zeros(0, dtype=np.int64),
        seed_base=np.zeros(1, dtype=np.int64),
        components=[],
    )


def _flat(column: pl.Series, fill: bool | None = None) -> np.ndarray:
    """The values of a list column, end to end (null lists contribute nothing)."""
    values = pc.list_flatten(column.to_arrow())
    if fill is not None:
        values = pc.fill_null(values, fill)
    return values.to_numpy(zero_copy_only=False)


_BATCHES = 16  # the attack files are read in at most this many batches: one batch's lists in memory at once
_LISTS = ("point_index", "point_correct", "point_broken", "point_broken_by")


def load_points(res: Results, settings: pl.DataFrame, vkey: pl.Expr) -> Points:
    """The usable attack rows' per-point outcomes, packed (Points): per row its vkey, dataset,
    seed, attack_label, threat model, eps, whether the run completes its model's worst case,
    and its points (correct clean, broken, the AutoAttack component that broke it). The files
    are read in a few batches, each packed before the next is read, so only one batch's Arrow
    lists are in memory at once. Element nulls, which no trial writes, count as correct and not
    broken (what all() and any() made of them when the points were exploded)."""
    files = res.attack_files
    ids = res.expected["trial_id"].implode() if res.expected is not None else None
    size = max(1, -(-len(files) // _BATCHES))
    metas: list[pl.DataFrame] = []
    indices: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    components: list[str] = []
    for i in range(0, len(files), size):
        batch = files[i : i + size]
        (rows,) = collect([_point_query(res, batch, ids)], batch)
        if not rows.height:
            continue
        _check_lists(rows)
        lengths = rows["length"].to_numpy()
        starts = np.cumsum(lengths) - lengths
        code = _flat(rows["point_correct"], True).view(np.uint8).copy()
        code |= _flat(rows["point_broken"], False).view(np.uint8) << 1
        _broken_by(rows, starts, code, components)
        n_ok = np.add.reduceat((code & _OK_MASK) == _CORRECT, starts, dtype=np.int64)
        indices.append(_flat(rows["point_index"]))
        codes.append(code)
        metas.append(rows.drop(*_LISTS).with_columns(pl.Series("n_ok", n_ok, pl.Int64)))
        del rows
    if not metas:
        return _empty_points()
    rows = pl.concat(metas)
    seeds, base_of_row, seed_base = _seed_slots(rows)
    # slot = the seed's base + point index, filled a batch at a time into one array (each
    # batch's index and code freed as it is copied: never two copies of all the points)
    lengths = rows["length"].to_numpy()
    slot = np.empty(int(lengths.sum()), dtype=np.int32 if seed_base[-1] < 2**31 else np.int64)
    code = np.empty(len(slot), dtype=np.uint8)
    first = start = 0
    for k, meta in enumerate(metas):
        n = int(meta["length"].sum())
        part = slot[start : start + n]
        part[:] = np.repeat(base_of_row[first : first + meta.height], meta["length"].to_numpy())
        part += indices[k]
        code[start : start + n] = codes[k]
        indices[k] = codes[k] = np.zeros(0)
        first, start = first + meta.height, start + n
    rows = rows.drop("_max", "_min").join(
        settings.select("dataset", "attack", "attack_preset", "attack_params", "attack_label"),
        on=["dataset", "attack", "attack_preset", "attack_params"],
        how="left",
        maintain_order="left",
    )
    rows = rows.with_columns(
        vkey,
        _detached().alias("detached"),
        pl.Series("start", np.cumsum(lengths) - lengths, pl.Int64),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("row"),
    )
    # Whether a run completes its model's worst case depends on its attack, parameters and
    # model kind only: judged once per distinct setting, not once per row.
    kinds = rows.select("attack", "attack_params", "stochastic", "detached").unique(maintain_order=True)
    kinds = kinds.with_columns(
        pl.Series(
            "completes",
            [completes_worst_case(a, _params(js), bool(s), d) for a, js, s, d in kinds.iter_rows()],
            pl.Boolean,
        )
    )
    rows = rows.join(
        kinds,
        on=["attack", "attack_params", "stochastic", "detached"],
        how="left",
        nulls_equal=True,
        maintain_order="left",
    )
    return Points(
        rows=rows.select([pl.col(name).cast(dtype) for name, dtype in _ROWS_SCHEMA.items()]),
        slot=slot,
        code=code,
        seeds=seeds,
        seed_base=seed_base,
        components=components,
    )


def _point_query(res: Results, files: list[str], ids: pl.Series | None) -> pl.LazyFrame:
    """The usable attack rows of `files` with their per-point lists, lengths and index range."""
    lazy = scan(files, res.dropped).select(*POINT_COLUMNS, "trial_id", "sweep", "status")
    # An attack that overstepped its budget does not count: its points are missing, not broken.
    lazy = lazy.filter(res.selected & (pl.col("status") == "ok") & pl.col("budget_ok").fill_null(False))
    if ids is not None:
        lazy = lazy.filter(pl.col("trial_id").is_in(ids))
    return lazy.filter(pl.col("point_index").list.len() > 0).with_columns(
        pl.col("point_index").list.len().cast(pl.Int64).alias("length"),
        pl.col("point_index").list.max().cast(pl.Int64).alias("_max"),
        pl.col("point_index").list.min().cast(pl.Int64).alias("_min"),
    )


def _check_lists(rows: pl.DataFrame) -> None:
    """Each row's per-point lists have one entry per point; a point index is >= 0; a seed is set."""
    for name in ("point_correct", "point_broken", "point_broken_by"):
        n = rows[name].list.len()
        # only AutoAttack rows name components: a null list there is no mismatch
        wrong = (
            (n.is_not_null() & (n != rows["length"]))
            if name == "point_broken_by"
            else (n.fill_null(-1) != rows["length"])
        )
        bad = rows.filter(wrong)
        if bad.height:
            raise SummaryError(
                f"attack row {bad['trial_id'][0]}: {name} has {bad[name].list.len()[0]} entries and point_index"
                f" {bad['length'][0]}: each per-point column must have one entry per point"
                f" ({bad.height} row(s) so)"
            )
    bad = rows.filter(pl.col("_min") < 0)
    if bad.height:
        raise SummaryError(
            f"attack row {bad['trial_id'][0]}: point_index holds {bad['_min'][0]}: a point index is >= 0"
        )
    if rows["seed"].null_count():
        raise SummaryError(f"{rows['seed'].null_count()} attack row(s) with points have no seed")


def _seed_slots(rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sorted seeds, each row's slot base, and each seed's slot range (seed_base[i] to
    seed_base[i + 1]: the seed's point indices 0 .. its largest)."""
    seed = rows["seed"].to_numpy().astype(np.int64)
    seeds, which = np.unique(seed, return_inverse=True)
    size = np.zeros(len(seeds), dtype=np.int64)
    np.maximum.at(size, which, rows["_max"].to_numpy() + 1)
    seed_base = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    return seeds, seed_base[which], seed_base


def _broken_by(rows: pl.DataFrame, starts: np.ndarray, code: np.ndarray, components: list[str]) -> None:
    """Puts each AutoAttack point's component into bits 2-7 of its code: 1 + its place in
    `components`, which grows with the names first seen here."""
    named = rows["point_broken_by"].is_not_null().to_numpy()
    if not named.any():
        return
    values = pc.list_flatten(rows["point_broken_by"].filter(pl.Series(named)).to_arrow())
    encoded = pc.dictionary_encode(values)
    for name in encoded.dictionary.to_pylist():
        if str(name) not in components:
            components.append(str(name))
    if len(components) > _MAX_COMPONENTS:
        raise SummaryError(
            f"point_broken_by names {len(components)} distinct components: at most {_MAX_COMPONENTS} are"
            f" supported (e.g. {components[:5]})"
        )
    # local dictionary index -> 1 + global place; a null (nothing broke the point) -> 0
    number = np.array([0, *(1 + components.index(str(n)) for n in encoded.dictionary.to_pylist())], np.uint8)
    local = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    where = _ranges(starts[named], rows["length"].to_numpy()[named])
    code[where] |= number[local] << 2


def expected_shards(res: Results) -> pl.DataFrame:
    """(dataset, seed, shard) of every attack row of the sweep, ok or failed: every model and
    attack of a dataset and seed is expected to cover all of them (one shared attack set)."""
    if not res.attack_files:
        return pl.DataFrame(schema=_SHARDS)
    lazy = scan(res.attack_files, res.dropped).filter(res.selected)
    if res.expected is not None:
        lazy = lazy.filter(pl.col("trial_id").is_in(res.expected["trial_id"].implode()))
    (ok,) = collect([lazy.select(*_SHARDS).unique()], res.attack_files)
    failed = res.failed.filter(pl.col("stage") == "attack").select(*_SHARDS).drop_nulls()
    return pl.concat([ok.cast(_SHARDS), failed.cast(_SHARDS)]).unique()  # type: ignore[arg-type]


def _coverage(
    points: pl.DataFrame, expected: pl.DataFrame
) -> tuple[dict[int, set[str]], dict[str, list[tuple[int, list[int]]]]]:
    """Per seed, the attack labels with rows; and per label, the seeds where it lacks some of
    the expected shards, with those shards (the comparison is then incomplete)."""
    have = points.select("dataset", "seed", "attack_label", "shard").unique()
    want = have.select("dataset", "seed", "attack_label").unique().join(expected, on=["dataset", "seed"])
    lacking = (
        want.join(have, on=["dataset", "seed", "attack_label", "shard"], how="anti", nulls_equal=True)
        .group_by("attack_label", "seed")
        .agg(pl.col("shard").sort())
        .sort("attack_label", "seed")
    )
    gaps: dict[str, list[tuple[int, list[int]]]] = {}
    for label, seed, shards in lacking.iter_rows():
        gaps.setdefault(label, []).append((seed, shards))
    labels: dict[int, set[str]] = {}
    for seed, label in have.select("seed", "attack_label").unique().iter_rows():
        labels.setdefault(seed, set()).add(label)
    return labels, gaps


def _shard_gaps(gaps: dict[str, list[tuple[int, list[int]]]]) -> str | None:
    """'pgd (seed 0: shards 2, 3)' for the shards a side's attacks lack."""
    parts = []
    for label, seeds in sorted(gaps.items()):
        for seed, shards in seeds:
            parts.append(
                f"{label} (seed {seed}: shard{'s' if len(shards) > 1 else ''} {', '.join(map(str, shards))})"
            )
    return "; ".join(parts) or None


def _detached() -> pl.Expr:
    """The attacked model hides its quantum branch's gradient (a backbone-alone control does not)."""
    return (pl.col("quantum_grad") == "detached").fill_null(False) & pl.col("control").ne_missing(
        BACKBONE_ONLY
    )


def _lacks(used: pl.DataFrame) -> str | None:
    """What the worst case made of these rows lacks before a verdict may rest on it (None:
    nothing): every seed's worst case must include the AutoAttack the model needs."""
    if used.group_by("seed").agg(pl.col("completes").any())["completes"].all():
        return None
    return needed_autoattack(bool(used["stochastic"].any()), bool(used["detached"].any()))


def _params(text: str | None) -> dict[str, Any]:
    return json.loads(text or "{}")


def _twin_labels(points: pl.DataFrame) -> set[str]:
    return set(points.filter(pl.col("attack").is_in(TWIN_ATTACKS))["attack_label"])


def _worst(points: Points, rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slot (seed, point): whether `rows` have it, whether it is robust under every one of
    them (correct clean and broken by none: the worst case), and the flat position of its
    first entry in row order (-1: none). Vectorized over all points of all the rows."""
    rows = rows.sort("row")
    e = points.entries(rows)
    slots = points.slot[e]
    present = np.zeros(points.n_slots, dtype=bool)
    present[slots] = True
    bad = np.zeros(points.n_slots, dtype=bool)
    bad[slots[(points.code[e] & _OK_MASK) != _CORRECT]] = True
    # e increases with the row number (rows sorted, Points.starts): the least is the first entry
    return present, present & ~bad, _first_positions(slots, points.n_slots, e)


def _first_positions(slots: np.ndarray, n_slots: int, values: np.ndarray | None = None) -> np.ndarray:
    """Per slot, `values` (default: positions 0, 1, ...) at the slot's first occurrence in
    `slots`, -1 where it does not occur. `values` must increase along `slots` (positions do).
    np.minimum.at, not a fancy assignment: NumPy does not say which of repeated writes stays,
    and np.unique's sort is 10 times slower at 10^7 entries."""
    values = np.arange(len(slots)) if values is None else values
    out = np.full(n_slots, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, slots, values)
    out[out == np.iinfo(np.int64).max] = -1
    return out


def _join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


def _missing(want: set[str], have: dict[int, set[str]], seeds: list[int]) -> str | None:
    """'pgd (seed 1); autoattack (seeds 0, 1)' for the attacks of `want` a side lacks per seed."""
    gaps: dict[str, list[int]] = {}
    for seed in seeds:
        for label in sorted(want - have.get(seed, set())):
            gaps.setdefault(label, []).append(seed)
    return (
        "; ".join(
            f"{label} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))})" for label, s in gaps.items()
        )
        or None
    )


def _used(seeds: list[int], labels: dict[int, set[str]]) -> pl.DataFrame:
    rows = [(s, label) for s in seeds for label in sorted(labels[s])]
    return pl.DataFrame(rows, schema={"seed": pl.Int32, "attack_label": pl.String}, orient="row")


class _WorstCache:
    """_worst of the last few row sets: the CNN baseline is a side of every hybrid's comparison."""

    def __init__(self, points: Points, size: int = 8) -> None:
        self.points, self.size = points, size
        self.kept: OrderedDict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def __call__(self, rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = rows["row"].sort().to_numpy().tobytes()
        if key in self.kept:
            self.kept.move_to_end(key)
            return self.kept[key]
        self.kept[key] = out = _worst(self.points, rows)
        if len(self.kept) > self.size:
            self.kept.popitem(last=False)
        return out


def _seed_pairs(
    points: Points, worst: _WorstCache, a: pl.DataFrame, b: pl.DataFrame
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per seed, the two sides' 0/1 robust outcomes (worst case over the rows of each side) on
    the points both have, in the order of the seed's permutation (shard, then place in it, as
    the first row of `a` holding the point has them): a sequential look takes a prefix."""
    has_a, robust_a, first_a = worst(a)
    has_b, robust_b, _ = worst(b)
    both = np.flatnonzero(has_a & has_b)
    if not len(both):
        return []
    seed = points.seed_of_slot(both)
    entry = first_a[both]
    row = np.searchsorted(points.starts, entry, side="right") - 1
    order = np.lexsort((entry - points.starts[row], points.shards[row], seed))
    both, seed = both[order], seed[order]
    cuts = np.flatnonzero(np.diff(seed)) + 1
    return [
        (x.astype(np.int8), y.astype(np.int8))
        for x, y in zip(np.split(robust_a[both], cuts), np.split(robust_b[both], cuts))
    ]


def _pairs_of(
    variants: pl.DataFrame, baselines: dict[str, str], named: list[tuple[str, str]] | None = None
) -> list[dict[str, Any]]:
    """Every comparison of the report: (kind, dataset, vkey_a, vkey_b, hybrid vkey). `named`:
    the sweep's `compare:` as (vkey_a, vkey_b), in place of each hybrid against the CNN; the
    hybrids' controls stay."""
    by_vkey = {r["vkey"]: r for r in variants.iter_rows(named=True)}
    out = [
        {
            "kind": VS_NAMED,
            "dataset": by_vkey[a]["dataset"],
            "a": a,
            "b": b,
            "hybrid": a,
            "equal_budget": False,
        }
        for a, b in named or []
        if a in by_vkey and b in by_vkey
    ]
    # Classical variants by what a hybrid's controls are: its backbone, trained the hybrid's way
    # (its method and settings: train_config, so a PGD-trained hybrid never meets a standard one's)
    by = {
        (r["dataset"], r["model"], r["train_method"], r["train_config"], r["control"]): r
        for r in variants.iter_rows(named=True)
        if r["entanglement"] is None
    }
    same = [k for k in VARIANT_KEYS if k != "control"]
    for h in variants.filter((pl.col("model") == "hqcnn") & pl.col("control").is_null()).iter_rows(
        named=True
    ):
        base = by_vkey.get(baselines.get(h["dataset"], ""))
        alone, fixed = (
            next((r for r in controls.iter_rows(named=True) if all(r[k] == h[k] for k in same)), None)
            for controls in (
                variants.filter(pl.col("control") == c) for c in (BACKBONE_ONLY, FIXED_RANDOMNESS)
            )
        )
        # a hybrid trained from scratch had its backbone's budget: the backbone alone is its control
        control = None if h["init"] == "scratch" else EQUAL_BUDGET
        budget = by.get((h["dataset"], h["backbone"], h["train_method"], budget_train_config(h), control))
        # ... and when that backbone is the CNN baseline itself, "vs CNN" is that comparison too
        same_budget = (
            named is None and budget is not None and base is not None and budget["vkey"] == base["vkey"]
        )
        for kind, a, b in (
            (VS_CNN, h, None if named is not None else base),
            (VS_BACKBONE_ALONE, h, alone),
            (VS_EQUAL_BUDGET, h, None if same_budget else budget),
            (BACKBONE_ALONE_VS_CNN, alone, base),
            (VS_FIXED_RANDOMNESS, h, fixed),
        ):
            if a is not None and b is not None:
                out.append(
                    {
                        "kind": kind,
                        "dataset": h["dataset"],
                        "a": a["vkey"],
                        "b": b["vkey"],
                        "hybrid": h["vkey"],
                        "equal_budget": kind == VS_EQUAL_BUDGET or (kind == VS_CNN and same_budget),
                    }
                )
    return out


def comparisons(
    points: Points,
    variants: pl.DataFrame,
    baselines: dict[str, str],
    margin: float,
    estimand: str = stats.MODELS,
    named: list[tuple[str, str]] | None = None,
    expected: pl.DataFrame | None = None,
    outcomes: dict[tuple[str, str, float], list[tuple[np.ndarray, np.ndarray]]] | None = None,
    unpaired: list[str] | None = None,
) -> pl.DataFrame:
    """One row per comparison and L-inf budget: robust accuracies, the paired difference A - B
    with its 95% interval and p-value for the question `estimand` (stats.MODELS or
    stats.PROCEDURE; `diff`, `low`, `high`, `p_value`, Holm-adjusted in its family (verdicts.holm_adjusted), and
    the verdict rest on it), the other question's answer beside it (`models_*`, `procedure_*`;
    the procedure's is null with one seed), and what would decide it at the margin. `named`: the
    sweep's compare: pairs (vkeys), else each hybrid against its CNN baseline. `expected`: the
    (dataset, seed, shard) every attack must cover (expected_shards; default: those the points
    show); an attack that lacks one on a seed counts as missing there. `outcomes`, if given,
    receives each comparison's per-seed paired outcomes in permutation order, keyed (a, b, eps);
    `unpaired`, the kind of each comparison at a budget with no paired points (no row; counted in
    Holm's family as never rejected)."""
    rows: list[dict[str, Any]] = []
    equivalent: list[bool] = []  # per row: may its verdict be "equal" (stats.verdict)
    # The kind of each comparison at a budget that one side reached and the pair did not (a side
    # without L-inf rows there, or no seed both sides completed): no row, but in Holm's family.
    without: list[str] = []
    if points.height:
        if expected is None:
            expected = points.rows.select("dataset", "seed", "shard").unique()
        linf = points.rows.filter(pl.col("threat_model") == WORST_CASE)
        by_vkey = linf.partition_by("vkey", as_dict=True)
        covered: dict[tuple[str, float], Any] = {}
        worst = _WorstCache(points)
        for pair in _pairs_of(variants, baselines, named):
            a_all, b_all = by_vkey.get((pair["a"],)), by_vkey.get((pair["b"],))
            budgets = [
                set(side["eps"].drop_nulls()) if side is not None else set() for side in (a_all, b_all)
            ]
            for eps in sorted(budgets[0] | budgets[1]):
                if a_all is None or b_all is None or eps not in budgets[0] & budgets[1]:
                    without.append(pair["kind"])  # one side has no L-inf row at this budget
                    continue
                a, b = a_all.filter(pl.col("eps") == eps), b_all.filter(pl.col("eps") == eps)
                # Expected: every plain attack either side got, and each side's own BPDA attacks.
                # Per seed, the worst case uses only what both sides completed (with budget_ok);
                # what a side lacks on a seed, an attack or some of its shards, makes the
                # comparison incomplete, never silently smaller (the pairs are the points both have).
                twin_a, twin_b = _twin_labels(a), _twin_labels(b)
                common = (set(a["attack_label"]) | set(b["attack_label"])) - twin_a - twin_b
                for key, side in (((pair["a"], eps), a), ((pair["b"], eps), b)):
                    if key not in covered:  # a variant is a side of several comparisons
                        covered[key] = _coverage(side, expected)
                (have_a, gaps_a), (have_b, gaps_b) = covered[(pair["a"], eps)], covered[(pair["b"], eps)]
                seeds = sorted(have_a.keys() | have_b.keys())
                missing_a = _join(_missing(common | twin_a, have_a, seeds), _shard_gaps(gaps_a))
                missing_b = _join(_missing(common | twin_b, have_b, seeds), _shard_gaps(gaps_b))
                both = [s for s in seeds if s in have_a and s in have_b]
                used_a = _used(
                    both, {s: (have_a[s] & have_b[s] & common) | (have_a[s] & twin_a) for s in both}
                )
                used_b = _used(
                    both, {s: (have_a[s] & have_b[s] & common) | (have_b[s] & twin_b) for s in both}
                )
                pairs = (
                    _seed_pairs(
                        points,
                        worst,
                        a.join(used_a, on=["seed", "attack_label"], how="semi"),
                        b.join(used_b, on=["seed", "attack_label"], how="semi"),
                    )
                    if used_a.height
                    else []
                )
                if not pairs:
                    without.append(pair["kind"])
                    continue
                if outcomes is not None:
                    outcomes[(pair["a"], pair["b"], eps)] = pairs
                res = stats.compare(pairs)
                used = res.answer(estimand)
                # "equal" for these models also needs the score tests at the margin (stats)
                equivalent.append(estimand != stats.MODELS or stats.score_equivalent(pairs, margin))
                attacks = ", ".join(sorted(common))
                if twin_a:
                    attacks += f" (the first also {', '.join(sorted(twin_a))})"
                if twin_b:
                    attacks += f" (the second also {', '.join(sorted(twin_b))})"
                rows.append(
                    {
                        **pair,
                        "eps": eps,
                        "attacks": attacks,
                        "lacks_a": _lacks(a.join(used_a, on=["seed", "attack_label"], how="semi")),
                        "lacks_b": _lacks(b.join(used_b, on=["seed", "attack_label"], how="semi")),
                        "missing_a": missing_a,
                        "missing_b": missing_b,
                        "n_points": res.n_points,
                        "n_seeds": res.n_seeds,
                        "robust_a": sum(int(x.sum()) for x, _ in pairs) / sum(len(x) for x, _ in pairs),
                        "robust_b": sum(int(y.sum()) for _, y in pairs) / sum(len(y) for _, y in pairs),
                        "estimand": estimand,
                        # no answer (the procedure with one seed): no interval, never decided
                        "diff": used.diff if used else res.models.diff,
                        "low": used.low if used else math.nan,
                        "high": used.high if used else math.nan,
                        "p_value": used.p_value if used else 1.0,
                        "models_low": res.models.low,
                        "models_high": res.models.high,
                        "models_p": res.models.p_value,
                        "procedure_diff": res.procedure.diff if res.procedure else None,
                        "procedure_low": res.procedure.low if res.procedure else None,
                        "procedure_high": res.procedure.high if res.procedure else None,
                        "procedure_p": res.procedure.p_value if res.procedure else None,
                        "per_seed": ", ".join(f"{d:+.1%}" for d in res.per_seed),
                        "a_only": res.a_only,
                        "b_only": res.b_only,
                        "points_needed": stats.points_needed(pairs, margin),
                        "seeds_needed": stats.seeds_needed(pairs, margin),
                    }
                )
    schema = {
        "kind": pl.String,
        "dataset": pl.String,
        "a": pl.String,
        "b": pl.String,
        "hybrid": pl.String,
        "eps": pl.Float64,
        "attacks": pl.String,
        "lacks_a": pl.String,
        "lacks_b": pl.String,
        "missing_a": pl.String,
        "missing_b": pl.String,
        "n_points": pl.Int64,
        "n_seeds": pl.Int64,
        "robust_a": pl.Float64,
        "robust_b": pl.Float64,
        "estimand": pl.String,  # the question diff, low, high, p_value and the verdict answer
        "diff": pl.Float64,
        "low": pl.Float64,
        "high": pl.Float64,
        "p_value": pl.Float64,
        "models_low": pl.Float64,  # "these trained models" (stats.MODELS)
        "models_high": pl.Float64,
        "models_p": pl.Float64,  # McNemar's exact test, discordant pairs summed over seeds
        "procedure_diff": pl.Float64,  # "the training procedure" (stats.PROCEDURE); null: one seed
        "procedure_low": pl.Float64,
        "procedure_high": pl.Float64,
        "procedure_p": pl.Float64,
        "per_seed": pl.String,
        "a_only": pl.Int64,
        "b_only": pl.Int64,
        "points_needed": pl.Float64,  # points per seed, at these seeds, to decide at the margin
        "seeds_needed": pl.Float64,  # seeds, at these points per seed, for the procedure; NaN: one seed
        "equal_budget": pl.Boolean,  # also (or only) the hybrid's equal-budget comparison
    }
    out = pl.DataFrame(rows, schema=schema)
    # A comparison without a row still counts in Holm's family, as never rejected (p = 1): a
    # failed side must not make the others' adjustment milder.
    holm = holm_adjusted(
        [*out["p_value"].to_list(), *[1.0] * len(without)],
        [*out["kind"].to_list(), *without],
        verdict_kind(named is not None),
    )[: out.height]
    if unpaired is not None:
        unpaired.extend(without)
    verdicts = [
        "incomplete"
        if r["missing_a"] or r["missing_b"]
        else stats.verdict(r["low"], r["high"], p, margin, equivalent=eq)
        for r, p, eq in zip(out.iter_rows(named=True), holm, equivalent)
    ]
    return out.with_columns(
        pl.Series("p_holm", holm, pl.Float64),
        pl.Series("verdict", verdicts, pl.String),
        (pl.col("lacks_a").is_not_null() | pl.col("lacks_b").is_not_null()).alias("provisional"),
    )


def worst_case_table(points: Points) -> pl.DataFrame:
    """Per variant and L-inf budget: robust accuracy under each attack and under all of them
    at once (per point), mean over seeds; n = points per seed."""
    schema = {
        "vkey": pl.String,
        "eps": pl.Float64,
        "attack_label": pl.String,
        "robust": pl.Float64,
        "n_points": pl.Int64,
        "n_seeds": pl.Int64,
    }
    if not points.height:
        return pl.DataFrame(schema=schema)
    linf = points.rows.filter(pl.col("threat_model") == WORST_CASE)
    each = linf.group_by("vkey", "eps", "attack_label", "seed").agg(
        (pl.col("n_ok").sum() / pl.col("length").sum()).alias("r"), pl.col("length").sum().alias("n")
    )
    worst = []
    for (vkey, eps), rows in linf.group_by("vkey", "eps"):
        present, robust, _ = _worst(points, rows)
        seeds = len(points.seeds)
        n = np.bincount(points.seed_of_slot(np.flatnonzero(present)), minlength=seeds)
        k = np.bincount(points.seed_of_slot(np.flatnonzero(robust)), minlength=seeds)
        have = np.flatnonzero(n)
        worst.append(
            pl.DataFrame(
                {
                    "vkey": vkey,
                    "eps": eps,
                    "attack_label": "worst case",
                    "seed": points.seeds[have],
                    "r": k[have] / n[have],
                    "n": n[have],
                },
                schema={
                    "vkey": pl.String,
                    "eps": pl.Float64,
                    "attack_label": pl.String,
                    "seed": pl.Int32,
                    "r": pl.Float64,
                    "n": pl.Int64,
                },
            )
        )
    both = pl.concat(
        [each.select("vkey", "eps", "attack_label", "seed", "r", "n"), *worst], how="vertical_relaxed"
    )
    return (
        both.group_by("vkey", "eps", "attack_label")
        .agg(
            pl.col("r").mean().alias("robust"),
            pl.col("n").max().cast(pl.Int64).alias("n_points"),
            pl.col("seed").n_unique().cast(pl.Int64).alias("n_seeds"),
        )
        .select(list(schema))
    )


AUTOATTACKS = tuple(name for name, a in ATTACKS.items() if a.autoattack)
_GAP_SCHEMA = {
    "vkey": pl.String,
    "eps": pl.Float64,
    "n_seeds": pl.Int64,
    "n_points": pl.Int64,
    "autoattack_only": pl.Int64,  # points AutoAttack broke and no other attack did
    "rest_only": pl.Int64,  # points another attack broke and AutoAttack did not
    "diff": pl.Float64,  # (autoattack_only - rest_only) / n_points
    "se": pl.Float64,
    "passed": pl.Boolean,
    "responsible": pl.String,  # the component behind most of autoattack_only
    "components": pl.String,  # autoattack_only by component: "apgd-t 5, fab-t 1"
}


def autoattack_gaps(points: Points) -> pl.DataFrame:
    """suite_vs_autoattack, per variant and L-inf budget with both an AutoAttack row and other
    L-inf attacks: does AutoAttack break significantly more points than the worst case of the
    variant's other attacks? Paired on the shared points (seeds pooled): d = broken by
    AutoAttack - broken by the rest; it fails when mean(d) exceeds 2 standard errors. Also
    counts, per AutoAttack component, the points it broke beyond the rest of the suite."""
    if not points.height:
        return pl.DataFrame(schema=_GAP_SCHEMA)
    linf = points.rows.filter(pl.col("threat_model") == WORST_CASE)
    rows = []
    groups = linf.group_by("vkey", "eps")  # in a fixed order (a null eps last)
    for (vkey, eps), grp in sorted(groups, key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0.0)):
        grp = grp.sort("row")
        e = points.entries(grp)
        slots, code = points.slot[e], points.code[e]
        is_aa = np.repeat(grp["attack"].is_in(AUTOATTACKS).to_numpy(), grp["length"].to_numpy())
        hit = (code & _OK_MASK) == _OK_MASK  # broken, and correct clean
        flags = {}
        for name, mask in (
            ("has_aa", is_aa),
            ("has_rest", ~is_aa),
            ("aa", is_aa & hit),
            ("rest", ~is_aa & hit),
        ):
            flags[name] = np.zeros(points.n_slots, dtype=bool)
            flags[name][slots[mask]] = True
        by = np.zeros(points.n_slots, dtype=np.uint8)  # the first AutoAttack row's component, in row order
        first = _first_positions(slots[is_aa & hit], points.n_slots)  # in row order
        held = first >= 0
        by[held] = (code[is_aa & hit] >> 2)[first[held]]
        keep = np.flatnonzero(flags["has_aa"] & flags["has_rest"])
        if not len(keep):
            continue
        aa, rest = flags["aa"][keep], flags["rest"][keep]
        d = pl.Series(aa.astype(np.int8) - rest.astype(np.int8))
        n = len(d)
        mean = float(d.mean())  # type: ignore[arg-type]
        se = float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")  # type: ignore[arg-type]
        names = ["?", *points.components]  # "?": an AutoAttack row that names no component
        beyond = Counter(names[c] for c in by[keep[aa & ~rest]])
        counts = sorted(beyond.items(), key=lambda ck: (-ck[1], ck[0]))  # most first, ties by name
        rows.append(
            {
                "vkey": vkey,
                "eps": eps,
                "n_seeds": len(np.unique(points.seed_of_slot(keep))),
                "n_points": n,
                "autoattack_only": int((aa & ~rest).sum()),
                "rest_only": int((rest & ~aa).sum()),
                "diff": mean,
                "se": se,
                "passed": mean <= 0 or mean <= 2 * se,
                "responsible": counts[0][0] if counts else None,
                "components": ", ".join(f"{c} {k}" for c, k in counts),
            }
        )
    return pl.DataFrame(rows, schema=_GAP_SCHEMA)
