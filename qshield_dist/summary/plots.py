"""Figures of the report (matplotlib, Agg backend): PNG always, SVG when asked.

The first is the forest plot of the paired verdicts (forest_vs_cnn), then the controls' one.
Every figure carries a caption naming the attacks (their settings are in the report's
attack-settings table), the number of seeds and of attacked samples, and what the error bars
are. A figure whose axis would hold a single value is skipped with a note instead of drawn.
"""

from __future__ import annotations

import io
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from qshield_dist.summary.tables import Tables
from qshield_dist.summary.verdicts import HYBRID, eps_text

log = logging.getLogger(__name__)

ENTANGLEMENT_ORDER = ("none", "linear", "star", "ring", "full")


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    png: bytes  # kept for the self-contained HTML
    topic: str  # the report section it illustrates: verdicts, controls, robustness or cost
    dataset: str | None = None  # set when it shows one dataset: it goes beside that dataset's tables


def _attack_caption(tables: Tables, dataset: str, attack_labels: list[str]) -> str:
    """The attacks by name, in the registry's order; their settings are in one table."""
    settings = tables.attacks.filter(
        (pl.col("dataset") == dataset) & pl.col("attack_label").is_in(attack_labels)
    )
    return ", ".join(settings.sort("attack_rank")["attack_label"])


def _counts(cells: pl.DataFrame, unit: str = "bar") -> str:
    s_lo, s_hi = cells["n_seeds"].min(), cells["n_seeds"].max()
    n_lo, n_hi = cells["n_attacked"].min(), cells["n_attacked"].max()
    seeds = f"{s_lo}" if s_lo == s_hi else f"{s_lo}-{s_hi}"
    samples = f"{n_lo}" if n_lo == n_hi else f"{n_lo}-{n_hi}"
    return f"seeds per {unit}: {seeds}; attacked samples per {unit} (summed over seeds): {samples}"


SVG_MAX_ARTISTS = 300  # beyond this many bars/points an SVG is slow to write and to open: PNG only


def _finish(
    fig: Any,
    out: Path,
    name: str,
    title: str,
    caption: str,
    svg: bool,
    topic: str,
    dataset: str | None = None,
) -> Figure:
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
    return Figure(name, title, caption, buf.getvalue(), topic, dataset)


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
    topic: str,
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
    return _finish(fig, out, name, title, caption, svg, topic, dataset)


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
    name, title = f"asr_vs_{axis}_{dataset}", f"ASR vs {axis} - {dataset}"
    return _finish(fig, out, name, title, caption, svg, "robustness", dataset)


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
    return _finish(fig, out, f"clean_vs_robust_{dataset}", title, caption, svg, "robustness", dataset)


# A verdict's colour, as the HTML page's badges show it.
VERDICT_COLOURS = {
    "more robust": "#1a7f37",
    "less robust": "#c62828",
    "equal": "#1f5fa8",
    "undecided": "#b26a00",
    "incomplete": "#6a3fa0",
}


def _forest(
    tables: Tables, paired: pl.DataFrame, out: Path, name: str, title: str, topic: str, svg: bool
) -> Figure | None:
    """The paired differences A - B of worst-case robust accuracy with their 95% intervals,
    one line per comparison, grouped by dataset (and budget), sorted by the difference; the
    +-margin band within which two models count as equal, and zero, marked."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    if not paired.height:
        return None
    labels = dict(zip(tables.variants["vkey"], tables.variants["label"]))
    many_eps = paired["eps"].n_unique() > 1
    ticks: list[str] = []  # top to bottom; group headers are bold
    lines: list[tuple[float, dict[str, Any]]] = []
    headers: list[float] = []
    for (dataset, eps), grp in paired.sort("dataset", "eps").group_by("dataset", "eps", maintain_order=True):
        headers.append(len(ticks))
        ticks.append(f"{dataset}" + (f", L-inf eps {eps_text(eps)}" if many_eps else ""))
        for r in grp.sort("diff", descending=True).iter_rows(named=True):
            lines.append((len(ticks), r))
            ticks.append(f"{labels.get(r['a'], r['a'])} vs {labels.get(r['b'], r['b'])}")
    fig, ax = plt.subplots(figsize=(10.0, 1.1 + 0.3 * len(ticks)))
    margin = 100 * tables.margin
    ax.axvspan(-margin, margin, color="#dddddd", zorder=0)
    ax.axvline(0, color="#444444", linewidth=0.8, zorder=1)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for y, r in lines:
        colour = VERDICT_COLOURS.get(r["verdict"], "#777777")
        diff, low, high = 100 * r["diff"], 100 * r["low"], 100 * r["high"]
        ax.plot([low, high], [y, y], color=colour, linewidth=2, zorder=2)
        face = "white" if r["provisional"] else colour
        ax.plot([diff], [y], marker="o", color=colour, markerfacecolor=face, markersize=7, zorder=3)
        text = f"{diff:+.1f} [{low:+.1f}, {high:+.1f}]"
        ax.text(1.01, y, text, transform=right, va="center", fontsize=8, color=colour)
    ax.set_yticks(range(len(ticks)), ticks, fontsize=8)
    for i in headers:
        ax.get_yticklabels()[i].set_fontweight("bold")
    ax.set_ylim(len(ticks) - 0.5, -0.5)
    ax.set_xlabel("difference in worst-case robust accuracy, A - B (percentage points)")
    present = [v for v in VERDICT_COLOURS if v in set(paired["verdict"])]
    handles = [Line2D([], [], color=VERDICT_COLOURS[v], marker="o", label=v) for v in present]
    if paired["provisional"].any():
        handles.append(
            Line2D([], [], color="#777777", marker="o", markerfacecolor="white", label="provisional")
        )
    handles.append(Line2D([], [], color="#dddddd", linewidth=8, label=f"equal band (±{margin:g} pp)"))
    ax.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncol=len(handles),
        fontsize=7,
        frameon=False,
    )
    ax.set_title(title, loc="left", pad=22, fontsize=10)
    fig.tight_layout()
    n_points = ", ".join(str(n) for n in sorted(set(paired["n_points"])))
    n_seeds = ", ".join(str(n) for n in sorted(set(paired["n_seeds"])))
    caption = (
        "Difference of worst-case robust accuracy (A - B, percentage points) on the shared attack set, with its"
        f" 95% interval for the question the verdicts answer ({tables.estimand}); grey band: ±{margin:g} pp, where an interval must lie"
        " (with the score tests at the margin) for the two to count as equal."
        f" Points per seed: {n_points}; seeds: {n_seeds}. Colour: the verdict; a hollow marker: provisional."
    )
    return _finish(fig, out, name, title, caption, svg, topic)


def make_plots(tables: Tables, out: Path, svg: bool = True) -> tuple[list[Figure], list[str]]:
    """All figures under `out`; returns them and the notes on the ones skipped."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in worker processes
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    skipped: list[str] = []
    vs_cnn = tables.paired["kind"] == tables.verdict_kind
    for name, title, topic, rows in (
        ("forest_vs_cnn", "Each hybrid against its CNN baseline", "verdicts", tables.paired.filter(vs_cnn)),
        (
            "forest_controls",
            "Where the gain comes from: the controls",
            "controls",
            tables.paired.filter(~vs_cnn),
        ),
    ):
        fig = _forest(tables, rows, out, name, title, topic, svg)
        if fig is not None:
            figures.append(fig)
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
                "robustness",
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
                "cost",
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
