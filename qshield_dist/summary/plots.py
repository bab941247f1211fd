"""Figures of the report (matplotlib, Agg backend): PNG always, SVG when asked.

Every figure carries a caption naming the attacks with their preset and parameters, the
number of seeds and of attacked samples, and what the error bars are. A figure whose axis
would hold a single value is skipped with a note instead of drawn.
"""

from __future__ import annotations

import io
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from qshield_dist.attack_params import params_text
from qshield_dist.summary.tables import Tables
from qshield_dist.summary.verdicts import HYBRID

log = logging.getLogger(__name__)

ENTANGLEMENT_ORDER = ("none", "linear", "star", "ring", "full")


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    png: bytes  # kept for the self-contained HTML


def _attack_caption(tables: Tables, dataset: str, attack_labels: list[str]) -> str:
    settings = tables.attacks.filter(
        (pl.col("dataset") == dataset) & pl.col("attack_label").is_in(attack_labels)
    )
    return "; ".join(
        f"{r['attack_label']} (preset {r['attack_preset']}: {params_text(r['attack_params'])})"
        for r in settings.sort("attack_rank").iter_rows(named=True)
    )


def _counts(cells: pl.DataFrame, unit: str = "bar") -> str:
    s_lo, s_hi = cells["n_seeds"].min(), cells["n_seeds"].max()
    n_lo, n_hi = cells["n_attacked"].min(), cells["n_attacked"].max()
    seeds = f"{s_lo}" if s_lo == s_hi else f"{s_lo}-{s_hi}"
    samples = f"{n_lo}" if n_lo == n_hi else f"{n_lo}-{n_hi}"
    return f"seeds per {unit}: {seeds}; attacked samples per {unit} (summed over seeds): {samples}"


SVG_MAX_ARTISTS = 300  # beyond this many bars/points an SVG is slow to write and to open: PNG only


def _finish(fig: Any, out: Path, name: str, title: str, caption: str, svg: bool) -> Figure:
    import matplotlib.pyplot as plt

    # The caption goes under the axes; bbox_inches="tight" grows the canvas to hold it.
    width_in = fig.get_size_inches()[0]
    wrapped = "\n".join(textwrap.wrap(caption, max(60, int(width_in * 15))))
    fig.text(0.01, -0.01, wrapped, fontsize=7, va="top", ha="left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    (out / f"{name}.png").write_bytes(buf.getvalue())
    artists = sum(len(ax.patches) + len(ax.collections) + len(ax.lines) for ax in fig.axes)
    if svg and artists <= SVG_MAX_ARTISTS:
        fig.savefig(out / f"{name}.svg", format="svg", bbox_inches="tight")
    plt.close(fig)
    return Figure(name, title, caption, buf.getvalue())


def _grouped_bars(
    tables: Tables,
    dataset: str,
    value: str,
    err: str | None,
    out: Path,
    name: str,
    title: str,
    ylabel: str,
    log_y: bool,
    svg: bool,
    scale: float = 1.0,
) -> Figure:
    import matplotlib.pyplot as plt

    cells = tables.cost.filter(pl.col("dataset") == dataset)
    cells = cells.join(tables.variants.select("vkey", "label", "family"), on="vkey", how="left")
    attacks = cells.sort("attack_rank")["attack_label"].unique(maintain_order=True).to_list()
    labels = cells.sort("family", "label")["label"].unique(maintain_order=True).to_list()
    width = 0.8 / max(len(labels), 1)
    width_in = min(16.0, max(7.0, 1.0 * len(attacks) + 0.12 * len(attacks) * len(labels)))
    fig, ax = plt.subplots(figsize=(width_in, 5.2))
    lookup = {(r["label"], r["attack_label"]): r for r in cells.iter_rows(named=True)}
    for i, label in enumerate(labels):
        xs, ys, es = [], [], []
        for j, attack in enumerate(attacks):
            r = lookup.get((label, attack))
            if r is None or r[value] is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(r[value] * scale)
            es.append((r[err] or 0.0) * scale if err else 0.0)
        ax.bar(xs, ys, width, yerr=es if err else None, label=label, capsize=2)
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(f"{title} - {dataset}")
    ax.legend(fontsize=6, ncol=max(1, len(labels) // 20), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    if err:
        bars = "error bars: sample std over seeds (ddof=1)"
    else:
        bars = "pooled over seeds: total seconds / total attacked samples"
    caption = f"{dataset}. {_counts(cells)}; {bars}. Attacks: {_attack_caption(tables, dataset, attacks)}."
    return _finish(fig, out, name, title, caption, svg)


def _asr_vs(
    tables: Tables, dataset: str, axis: str, out: Path, svg: bool, skipped: list[str]
) -> Figure | None:
    import matplotlib.pyplot as plt

    cells = tables.cost.filter(
        (pl.col("dataset") == dataset)
        & (pl.col("model") == HYBRID)
        & pl.col("control").is_null()
        & pl.col(axis).is_not_null()
    )
    values = cells[axis].unique().to_list()
    if len(values) < 2:
        skipped.append(
            f"ASR vs {axis} ({dataset}): skipped, the hybrid variants have a single {axis} value"
            f" ({', '.join(map(str, values)) or 'none'})"
        )
        return None
    if axis == "entanglement":
        order = [e for e in ENTANGLEMENT_ORDER if e in values] + sorted(set(values) - set(ENTANGLEMENT_ORDER))
        position = {e: i for i, e in enumerate(order)}
        cells = cells.with_columns(pl.col(axis).replace_strict(position, return_dtype=pl.Int64).alias("_x"))
    else:
        order = None
        cells = cells.with_columns(pl.col(axis).cast(pl.Float64).alias("_x"))
    # Other hybrid settings that vary are averaged over (said in the caption).
    settings = (
        "entanglement",
        "depth",
        "noise_model",
        "noise_strength",
        "encoding",
        "fusion",
        "quantum_grad",
        "projection",
        "backbone",
    )
    others = [c for c in settings if c != axis and cells[c].n_unique() > 1]
    line = (
        cells.group_by("attack_label", "attack_rank", "_x")
        .agg(pl.col("asr_mean").mean(), pl.col("n_seeds").sum(), pl.col("n_attacked").sum())
        .sort("attack_rank", "_x")
    )
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (attack,), grp in line.group_by("attack_label", maintain_order=True):
        ax.plot(grp["_x"].to_list(), (grp["asr_mean"] * 100).to_list(), marker="o", label=attack)
    if order is not None:
        ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(axis)
    ax.set_ylabel("ASR (%)")
    ax.set_title(f"ASR vs {axis} - {dataset} (hybrid variants)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if others:
        avg = f"averaged over the other varying settings ({', '.join(others)})"
    else:
        avg = "all other settings fixed"
    attacks = line["attack_label"].unique(maintain_order=True).to_list()
    caption = (
        f"{dataset}. Mean ASR over seeds, {avg}; {_counts(cells, 'cell averaged into a point')}."
        f" Attacks: {_attack_caption(tables, dataset, attacks)}."
    )
    return _finish(fig, out, f"asr_vs_{axis}_{dataset}", f"ASR vs {axis} - {dataset}", caption, svg)


def _clean_vs_robust(tables: Tables, dataset: str, out: Path, svg: bool) -> Figure | None:
    import matplotlib.pyplot as plt

    cells = tables.cost.filter(pl.col("dataset") == dataset)
    if not cells.height:
        return None
    # Robust accuracy under the strongest attack of each variant (its lowest robust accuracy).
    worst = cells.sort("robust_mean").group_by("vkey", maintain_order=True).first()
    pts = (
        worst.join(tables.clean, on="vkey", how="left")
        .join(tables.variants.select("vkey", "label"), on="vkey")
        .filter(pl.col("clean_mean").is_not_null())
    )
    if not pts.height:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for r in pts.iter_rows(named=True):
        ax.scatter(r["clean_mean"] * 100, r["robust_mean"] * 100, s=25)
        ax.annotate(
            f"{r['label']} ({r['attack_label']})",
            (r["clean_mean"] * 100, r["robust_mean"] * 100),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy under the strongest attack (%)")
    ax.set_title(f"Clean vs robust accuracy - {dataset}")
    fig.tight_layout()
    attacks = pts["attack_label"].unique().to_list()
    caption = (
        f"{dataset}. One point per model variant: mean clean accuracy over seeds vs the lowest mean robust"
        f" accuracy over all attacks that ran on it (the attack in brackets); {_counts(pts, 'point')}."
        f" Attacks: {_attack_caption(tables, dataset, attacks)}."
    )
    title = f"Clean vs robust accuracy - {dataset}"
    return _finish(fig, out, f"clean_vs_robust_{dataset}", title, caption, svg)


def make_plots(tables: Tables, out: Path, svg: bool = True) -> tuple[list[Figure], list[str]]:
    """All figures under `out`; returns them and the notes on the ones skipped."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in worker processes
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    skipped: list[str] = []
    for dataset in tables.cost["dataset"].unique().sort().to_list():
        figures.append(
            _grouped_bars(
                tables,
                dataset,
                "asr_mean",
                "asr_std",
                out,
                f"asr_{dataset}",
                "Attack success rate",
                "ASR (%)",
                False,
                svg,
                scale=100.0,
            )
        )
        figures.append(
            _grouped_bars(
                tables,
                dataset,
                "sec_per_sample",
                None,
                out,
                f"attack_time_{dataset}",
                "Attack time per attacked sample",
                "seconds per sample (log)",
                True,
                svg,
            )
        )
        for axis in ("noise_strength", "entanglement", "depth"):
            fig = _asr_vs(tables, dataset, axis, out, svg, skipped)
            if fig is not None:
                figures.append(fig)
        fig = _clean_vs_robust(tables, dataset, out, svg)
        if fig is not None:
            figures.append(fig)
    if not tables.cost.height:
        skipped.append("no usable attack rows: no figures")
    for note in skipped:
        log.info("plot %s", note)
    return figures, skipped
