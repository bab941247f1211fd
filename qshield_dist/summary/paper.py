"""The published QShield numbers (paper_results.csv) beside the measured ones.

Matching: dataset by name (digits only with an explicit proxy, e.g. digits=mnist), model
DNN->dnn, CNN->cnn, HQCNN-<ent>->hqcnn with that entanglement, attack by name with the
`paper` preset. Whatever differs from the paper's setting (backbone, projection, gradient
path, attack parameters) is written in `notes`; measured rows with no published
counterpart, and published rows of a measured dataset that were not run, are kept and
marked in `match`.

Times: the paper gives seconds for its whole attacked set, whose size and hardware are not
ours, so times are compared as ratios to the CNN of the same dataset and attack.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import polars as pl

from qshield_dist.attack_params import ATTACKS, PAPER_SUITE
from qshield_dist.datasets import DATASETS
from qshield_dist.summary.tables import Tables
from qshield_dist.summary.verdicts import HYBRID
from qshield_dist.vocabulary import STANDARD

PAPER_DATASETS = {name: info.paper_name for name, info in DATASETS.items() if info.paper_name}
# The paper's HQCNN configuration, as the project's settings (see paper-protocol.md).
PAPER_HYBRID = {
    "backbone": "cnn",
    "encoding": "enhanced_angle",
    "noise_model": "mixed",
    "noise_strength": 0.005,
    "fusion": "dynamic",
    "projection": "paper",
    "quantum_grad": "detached",
}
_WHY = {
    "backbone": "paper backbone is ResNet-18 ('cnn')",
    "projection": "paper redraws a random projection on every call",
    "quantum_grad": "paper's quantum branch passes no gradient to the input",
}
COLUMNS = [
    "dataset",
    "paper_dataset",
    "label",
    "paper_model",
    "metric",
    "attack",
    "measured",
    "n",
    "paper",
    "diff",
    "match",
    "notes",
]


def paper_attack_params() -> dict[str, dict[str, dict[str, Any]]]:
    """paper dataset -> paper attack -> the paper's parameters, from the attack registry."""
    return {d: {name: ATTACKS[name].params(d, "paper") for name in PAPER_SUITE} for d in PAPER_DATASETS}


def load_paper() -> pl.DataFrame:
    """Published numbers; ASR converted from percent to a fraction like the measured ones."""
    path = resources.files("qshield_dist.summary").joinpath("paper_results.csv")
    with resources.as_file(path) as p:
        overrides = {"entanglement": pl.String, "attack": pl.String, "value": pl.Float64}
        df = pl.read_csv(p, schema_overrides=overrides)
    return df.with_columns(
        pl.when(pl.col("unit") == "percent")
        .then(pl.col("value") / 100)
        .otherwise(pl.col("value"))
        .alias("value"),
        pl.col("entanglement").fill_null(""),
        pl.col("attack").fill_null(""),
    )


def _paper_model(row: dict[str, Any]) -> str | None:
    if row.get("control") or row.get("train_method") not in (None, STANDARD):
        return None  # controls and adversarially trained models are this project's, not the paper's
    if row["model"] in ("dnn", "cnn"):
        return row["model"].upper()
    if row["model"] == HYBRID and row["entanglement"] in ("none", "linear", "star", "full"):
        return f"HQCNN-{row['entanglement']}"
    return None


def _setting_notes(row: dict[str, Any]) -> list[str]:
    if row["model"] != HYBRID:
        return []
    notes = []
    for key, want in PAPER_HYBRID.items():
        if row.get(key) is not None and row[key] != want:
            notes.append(f"{key}={row[key]:g}" if isinstance(row[key], float) else f"{key}={row[key]}")
            if key in _WHY:
                notes[-1] += f" ({_WHY[key]})"
    return notes


def _param_notes(attack: str, preset: str, params: str, published: dict[str, Any] | None) -> list[str]:
    """What differs from the paper's attack: preset, then each parameter."""
    if published is None:
        return []  # not an attack of the paper: the match column says so
    notes = [] if preset == "paper" else [f"preset {preset}"]
    try:
        measured = json.loads(params or "{}")
    except json.JSONDecodeError:
        return notes + ["attack parameters not readable"]
    diff = [f"{k}={measured.get(k)} (paper {v})" for k, v in published.items() if measured.get(k) != v]
    return notes + ([f"params differ: {', '.join(diff)}"] if diff else [])


def compare(tables: Tables, proxies: dict[str, str] | None = None) -> pl.DataFrame:
    """Long table: one row per (dataset, variant, metric, attack) measured or published."""
    proxies = proxies or {}
    paper = load_paper()
    published_params = paper_attack_params()
    by_key = {
        (r["dataset"], r["paper_model"], r["metric"], r["attack"]): r["value"]
        for r in paper.iter_rows(named=True)
    }
    variants = tables.variants.join(tables.clean, on="vkey", how="left")
    baselines = tables.baselines
    labels = dict(zip(tables.variants["vkey"], tables.variants["label"]))
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str, str]] = set()

    def matched(v: dict[str, Any]) -> str:
        return "proxy dataset" if v["dataset"] in proxies else "exact"

    def add(
        v: dict[str, Any],
        pds: str | None,
        pmodel: str | None,
        metric: str,
        attack: str,
        measured: float | None,
        extra: list[str],
        size: str = "",
    ) -> None:
        published = by_key.get((pds, pmodel, metric, attack)) if pds and pmodel else None
        if pds is None:
            match = f"no counterpart: dataset {v['dataset']} is not in the paper"
        elif pmodel is None:
            match = f"no counterpart: model {v['label']} is not in the paper"
        elif published is None:
            of_attack = f" for {attack}" if attack else ""
            match = f"no counterpart: the paper has no {metric}{of_attack} of {pmodel}"
        else:
            match = matched(v)
            seen.add((pds, pmodel, metric, attack))
        notes = (_setting_notes(v) if pmodel else []) + extra
        rows.append(
            {
                "dataset": v["dataset"],
                "paper_dataset": PAPER_DATASETS.get(pds or "", None),
                "label": v["label"],
                "paper_model": pmodel,
                "metric": metric,
                "attack": attack,
                "measured": measured,
                "n": size,
                "paper": published,
                "diff": None if measured is None or published is None else measured - published,
                "match": match,
                "notes": "; ".join(notes),
            }
        )

    base_train = {
        r["dataset"]: r["train_seconds"]
        for r in variants.iter_rows(named=True)
        if baselines.get(r["dataset"]) == r["vkey"]
    }
    cost_by = tables.cost.partition_by("vkey", as_dict=True)
    empty = tables.cost.head(0)
    for v in variants.sort("dataset", "family", "label").iter_rows(named=True):
        pds = proxies.get(v["dataset"], v["dataset"])
        pds = pds if pds in PAPER_DATASETS else None
        pmodel = _paper_model(v)
        if v["clean_mean"] is not None:
            add(v, pds, pmodel, "accuracy", "", v["clean_mean"], [], f"s={v['clean_seeds']}")
        ratio = None
        if v.get("train_seconds") is not None and base_train.get(v["dataset"]):
            ratio = v["train_seconds"] / base_train[v["dataset"]]
        if pmodel and pds and pmodel != "CNN" and ratio is not None:
            b = by_key.get((pds, "CNN", "train_seconds", ""))
            m = by_key.get((pds, pmodel, "train_seconds", ""))
            extra = [f"ratio to {labels[baselines[v['dataset']]]}'s training time; paper: to CNN"]
            if v.get("init") == "from_baseline":
                extra.append("hybrid time excludes its backbone's pre-training")
            rows_before = len(rows)
            add(v, pds, pmodel, "train_time_ratio_vs_cnn", "", ratio, extra)
            if b and m:
                rows[rows_before]["paper"] = m / b
                rows[rows_before]["diff"] = ratio - m / b
                rows[rows_before]["match"] = matched(v)
                seen.add((pds, pmodel, "train_time_ratio_vs_cnn", ""))
        cells = cost_by.get((v["vkey"],), empty).sort("attack_rank")
        for c in cells.iter_rows(named=True):
            attack = c["attack"]
            paper_params = published_params.get(pds or "", {}).get(attack)
            extra = _param_notes(attack, c["attack_preset"], c["attack_params"], paper_params)
            is_paper_attack = c["attack_preset"] == "paper" and not extra
            add(v, pds, pmodel, "asr", attack, c["asr_mean"], extra, f"s={c['n_seeds']}, n={c['n_attacked']}")
            if not is_paper_attack and rows[-1]["paper"] is not None:
                rows[-1]["match"] += " (setting differs)"
            if pmodel and pds and pmodel != "CNN" and c["time_ratio"] is not None:
                b = by_key.get((pds, "CNN", "attack_seconds", attack))
                m = by_key.get((pds, pmodel, "attack_seconds", attack))
                n = len(rows)
                why = f"per attacked sample, ratio to {c['baseline']}; paper: whole-set seconds ratio to CNN"
                add(v, pds, pmodel, "attack_time_ratio_vs_cnn", attack, c["time_ratio"], extra + [why])
                if b and m:
                    rows[n].update(paper=m / b, diff=c["time_ratio"] - m / b, match=matched(v))
                    seen.add((pds, pmodel, "attack_time_ratio_vs_cnn", attack))

    # Published rows of the datasets measured here that nothing measured matched.
    measured_pds = {proxies.get(d, d) for d in tables.variants["dataset"].unique()} & set(PAPER_DATASETS)
    unmatched = paper.filter(
        pl.col("dataset").is_in(list(measured_pds)) & pl.col("metric").is_in(["accuracy", "asr"])
    )
    for r in unmatched.iter_rows(named=True):
        if (r["dataset"], r["paper_model"], r["metric"], r["attack"]) in seen:
            continue
        measured_name = next((d for d, p in proxies.items() if p == r["dataset"]), r["dataset"])
        rows.append(
            {
                "dataset": measured_name,
                "paper_dataset": r["paper_dataset"],
                "label": None,
                "paper_model": r["paper_model"],
                "metric": r["metric"],
                "attack": r["attack"],
                "measured": None,
                "n": "",
                "paper": r["value"],
                "diff": None,
                "match": "not measured here",
                "notes": "",
            }
        )
    schema = {c: pl.String for c in COLUMNS}
    schema |= {"measured": pl.Float64, "paper": pl.Float64, "diff": pl.Float64}
    return pl.DataFrame(rows, schema=schema)
