"""The report's sections of the paired judgements: the verdicts, the controls and the
worst-case robust accuracy behind them.

Each formats what paired.py and verdicts.py judged. A comparison is one table row, the same
in the verdicts and in the controls (`_comparison_row`): the two models, their worst-case
robust accuracy, the paired difference with its interval, the verdict as badges, the attacks
it rests on and what a provisional one lacks (verdicts.sides_text), what would resolve it, and
the failed diagnostics of either model (verdicts.failed_checks). A verdict's `missing` (what an
incomplete one misses) and `not_covered` are shown when its frame has them. The other sections
are in sections.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from qshield_dist.summary.plots import Figure
from qshield_dist.summary.render import BADGE_SEP, Section, TextTable, pct, size
from qshield_dist.summary.sections import label_map
from qshield_dist.summary.sequential import DECISIONS_FILE
from qshield_dist.summary.stats import MODELS, PROCEDURE
from qshield_dist.summary.tables import Tables
from qshield_dist.summary.verdicts import (
    eps_text,
    failed_checks,
    flags_text,
    gain_sources,
    gain_text,
    other_question_text,
    resolve_text,
    sides_text,
)
from qshield_dist.vocabulary import COMPARISON_KINDS, VS_CNN

VERDICT_TABLE = "Each hybrid against its CNN baseline"
NAMED_TABLE = "The comparisons the sweep names (compare:)"
CONTROL_TABLE = "Each hybrid against its controls"


def _how_to_read(tables: Tables) -> str:
    return (
        "**How to read this.** Both models answer on the same test points (the shared attack set); a point is"
        " robust when it is classified correctly clean and no L-inf attack at that budget broke it (the worst"
        " case over the attacks named; a stochastic model is broken when misclassified in a strict majority of"
        " one attack's evaluations; BPDA attacks count for the model whose gradient is hidden). The difference"
        " is the first model's minus the second's, in percentage points, with its 95% interval for the question"
        f" the verdict answers: {_question(tables)} The other question's interval is shown beside it."
        " The verdict comes from the interval, never from the point estimate: more robust or less"
        " robust when it excludes 0 and the Holm-adjusted p < 0.05 over this report's verdicts (the controls'"
        " comparisons are adjusted apart, as a family of their own); equal when it lies inside"
        f" ±{100 * tables.margin:g} pp and, for {MODELS}, both one-sided score tests of a difference at the"
        " margin reject too (never on few agreeing points: with no discordant point an interval is as wide as"
        " the exact bound on the disagreement its points allow, and Tango's score tests keep a false equal"
        " at or under 2.5% where the interval alone, on a few discordant points, did not); undecided otherwise, with what would decide it"
        f" at that margin (power 0.8): points per seed at the seeds run ({MODELS}), seeds at the points"
        f" run ({PROCEDURE}). Provisional: a model's worst case lacks AutoAttack at its"
        " authors' strength in the form that model needs (standard on a deterministic model, rand on a"
        " stochastic one, through BPDA where the quantum branch's gradient is detached); the attacks cell says"
        " what it lacks. Flags: the failed diagnostics of either model (suite_vs_autoattack names the"
        " AutoAttack component behind it)."
    )


def _question(tables: Tables) -> str:
    if tables.estimand == PROCEDURE:
        return (
            f"**{PROCEDURE}** (seeds are the unit: the per-seed differences, a t interval on seeds - 1 df;"
            " with one seed it is undefined and the verdict undecided)."
        )
    return (
        f"**{MODELS}** (the trained models are fixed, points are the unit, each seed a stratum; McNemar's"
        " exact test on the discordant points of all seeds); it does not say whether another training run"
        " would agree."
    )


def _train_seconds(tables: Tables) -> dict[str, float]:
    """vkey -> its mean training seconds over seeds (train rows; none for a backbone alone)."""
    known = tables.clean.filter(pl.col("train_seconds").is_not_null())
    return dict(known.select("vkey", "train_seconds").iter_rows())


def _seconds(cost: dict[str, float], vkey: str) -> str:
    return f"{cost[vkey]:.3g}" if vkey in cost else "-"


def _comparison_row(
    r: dict[str, Any],
    labels: dict[str, str],
    checks: dict[str, str],
    many_eps: bool,
    cost: dict[str, float],
) -> list[str]:
    """One paired comparison (a row of tables.paired, with the verdict frame's columns where
    it is a verdict) as table cells; `checks` is verdicts.failed_checks."""
    badges = [r["verdict"]] + (["provisional"] if r["provisional"] else [])
    attacks = r["attacks"]
    if r["provisional"]:
        attacks += f"; lacks {sides_text(r, labels, 'lacks')}"
    if sides_text(r, labels, "missing"):
        attacks += f"; missing {sides_text(r, labels, 'missing')}"
    diff = f"{100 * r['diff']:+.1f}" + (
        f" [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]" if r["low"] == r["low"] else " (no interval)"
    )
    points = str(r["n_points"])
    if r["n_seeds"] > 1:
        diff += f"; per seed {r['per_seed']}"
        points += f" × {r['n_seeds']} seeds"
    resolve = resolve_text(r) if r["verdict"] == "undecided" else "-"
    flagged = [flags_text(r, labels, checks)]
    if r.get("not_covered"):
        flagged.append(f"not covered: {r['not_covered']}")
    return [
        *([eps_text(r["eps"])] if many_eps else []),
        labels.get(r["a"], r["a"]),
        labels.get(r["b"], r["b"]),
        f"{100 * r['robust_a']:.1f} vs {100 * r['robust_b']:.1f}",
        f"{_seconds(cost, r['a'])} vs {_seconds(cost, r['b'])}",
        diff,
        other_question_text(r),
        BADGE_SEP.join(badges),
        attacks,
        points,
        resolve,
        f"{r['p_value']:.3g} (Holm {r['p_holm']:.3g})",
        "; ".join(f for f in flagged if f) or "-",
    ]


_COMPARISON_HEADERS = [
    "model",
    "vs",
    "robust acc %",
    "training s",
    "difference, pp [95% CI]",
    "the other question",
    "verdict",
    "attacks (worst case)",
    "points",
    "to resolve",
    "p",
    "flags",
]


def _headers(many_eps: bool) -> list[str]:
    return (["L-inf eps"] if many_eps else []) + _COMPARISON_HEADERS


def _budget_note(paired: pl.DataFrame) -> str:
    eps = paired["eps"].unique().to_list()
    return f"All at L-inf eps {eps_text(eps[0])}. " if len(eps) == 1 else ""


def verdict_section(tables: Tables, figures: list[Figure]) -> Section:
    """The verdicts as one table, then their forest plot."""
    sec = Section("Verdicts")
    if sanity_text(tables):
        sec.add(sanity_text(tables))
    v = tables.verdicts
    if not v.height:
        return sec.add("No HQCNN variant in these results.")
    labels, checks = label_map(tables), failed_checks(tables.diagnostics)
    cost = _train_seconds(tables)
    paired = {
        (r["a"], r["b"], r["eps"]): r
        for r in tables.paired.filter(pl.col("kind") == tables.verdict_kind).iter_rows(named=True)
    }
    many_eps = v["eps"].drop_nulls().n_unique() > 1
    rows = []
    for verdict in v.iter_rows(named=True):
        r = paired.get((verdict["vkey"], verdict["vkey_b"], verdict["eps"]))
        if r is None:
            cells = [labels.get(verdict["vkey"], verdict["vkey"]), "-", "-", "-", "-", "-", "no comparison"]
            cells += ["no L-inf attack in common with a CNN baseline", "-", "-", "-", "-"]
            rows.append([verdict["dataset"], *([None] if many_eps else []), *cells])
            continue
        # The verdict frame's category, and what its verdict does not cover.
        judged = {**r, "not_covered": verdict["not_covered"]}
        judged["verdict"] = verdict["category"]
        rows.append([verdict["dataset"], *_comparison_row(judged, labels, checks, many_eps, cost)])
    caption = _budget_note(tables.paired) + _how_to_read(tables)
    title = VERDICT_TABLE if tables.verdict_kind == VS_CNN else NAMED_TABLE
    sec.add(TextTable(title, ["dataset", *_headers(many_eps)], rows, caption, badges="verdict"))
    return sec.add(*figures)


def sanity_text(tables: Tables) -> str:
    """AutoAttack's own sanity checks, said before any verdict ('' without an AutoAttack row)."""
    checks = tables.diagnostics.filter(pl.col("diagnostic") == "autoattack_sanity")
    if not checks.height:
        return ""
    labels = label_map(tables)
    failed = [
        f"{labels.get(r['vkey'], r['vkey'])} ({json.loads(r['details'])['responsible']})"
        for r in checks.filter(pl.col("n_pass") < pl.col("n")).iter_rows(named=True)
    ]
    if not failed:
        return (
            f"AutoAttack's sanity checks (randomness over 5 passes, softmax output, autograd calls at"
            f" inference) pass on all {checks.height} models it attacked."
        )
    return "**AutoAttack's sanity checks fail** on: " + "; ".join(failed) + "."


def controls_section(tables: Tables, figures: list[Figure]) -> Section:
    sec = Section("Controls: where does the gain come from?")
    c = tables.controls
    gains = gain_sources(tables.paired, tables.margin)
    if not c.height and not gains.height:
        return sec.add(
            "No control rows (control 'backbone_only' or 'equal_budget'):"
            " the gain cannot be attributed to the quantum branch or the backbone."
        )
    labels, checks = label_map(tables), failed_checks(tables.diagnostics)
    cost = _train_seconds(tables)
    sec.add(
        "backbone alone = the hybrid's own trained backbone with the quantum branch removed;"
        " equal-budget backbone = the backbone architecture trained alone for as many steps as the hybrid got."
        " Where the gain comes from is judged from paired intervals of worst-case robust accuracy:"
        " the quantum part (hybrid vs its backbone alone; it includes the fusion head) and the backbone part"
        " (backbone alone vs the CNN). A part is a gain when its verdict is 'more robust' and no gain when its"
        f" whole interval lies below +{100 * tables.margin:g} pp; where an interval leaves it open, the answer is undecided."
        " The table reads as the verdicts' table does."
    )
    for g in gains.iter_rows(named=True):
        sec.add(
            f"- **{labels.get(g['vkey_h'], g['vkey_h'])}** (L-inf eps {eps_text(g['eps'])}): {gain_text(g)}"
        )
    kind_order = {k: i for i, k in enumerate(COMPARISON_KINDS)}
    controls = (
        tables.paired.filter(pl.col("kind") != tables.verdict_kind)
        .with_columns(pl.col("kind").replace_strict(kind_order, return_dtype=pl.Int64).alias("_order"))
        .sort("dataset", "hybrid", "eps", "_order")
    )
    if controls.height:
        many_eps = controls["eps"].n_unique() > 1
        rows = [
            [r["kind"], *_comparison_row(r, labels, checks, many_eps, cost)]
            for r in controls.iter_rows(named=True)
        ]
        caption = _budget_note(controls) + "How to read it: as the verdicts' table."
        sec.add(
            TextTable(CONTROL_TABLE, ["comparison", *_headers(many_eps)], rows, caption, badges="verdict")
        )
    sec.add(*figures)
    if c.height:
        rows = [
            [
                r["dataset"],
                labels.get(r["vkey_h"], r["vkey_h"]),
                r["attack_label"],
                pct(r["asr_hybrid"]),
                pct(r["asr_backbone_only"]),
                pct(r["asr_equal_budget"]),
                pct(r["asr_baseline"]),
                pct(r["gain_backbone"]),
                pct(r["gain_quantum"]),
                size(r["n_seeds"], r["n_attacked"]),
            ]
            for r in c.iter_rows(named=True)
        ]
        headers = [
            "dataset",
            "hybrid",
            "attack",
            "ASR hybrid %",
            "ASR backbone alone %",
            "ASR equal-budget backbone %",
            "ASR baseline %",
            "gain: backbone (pp)",
            "gain: quantum (pp)",
            "hybrid: seeds, samples",
        ]
        sec.add(
            TextTable(
                "Hybrid vs its backbone alone, per attack (mean ASR over seeds; point estimates)",
                headers,
                rows,
            )
        )
    return sec


def worst_case_section(tables: Tables) -> Section:
    sec = Section("Worst-case robust accuracy")
    w = tables.worst_case
    if not w.height:
        sec.add("No per-point outcomes in these results (attack rows older than the shared attack set?).")
        return sec
    sec.add(
        "Robust accuracy on the shared attack set (correct clean and not broken), in percent, per L-inf"
        " attack and under all of them at once, point by point (worst case); mean over seeds."
        " [s = seeds when more than one, n = points per seed]. Minimum-norm (C&W, DeepFool: L2) and One-Pixel"
        " (L0) attacks are in the robustness table, never mixed into this worst case."
    )
    attacks = (
        tables.attacks.filter(pl.col("threat_model") == "linf")
        .sort("attack_rank")["attack_label"]
        .unique(maintain_order=True)
        .to_list()
    )
    cols = [*attacks, "worst case"]
    for (eps,), grp in w.sort("eps").group_by("eps", maintain_order=True):
        cells = {(r["vkey"], r["attack_label"]): r for r in grp.iter_rows(named=True)}
        vkeys = tables.variants.filter(pl.col("vkey").is_in(grp["vkey"].implode())).sort(
            "dataset", "family", "label"
        )
        rows = []
        for v in vkeys.iter_rows(named=True):
            worst = cells.get((v["vkey"], "worst case"))
            points = size(worst["n_seeds"], worst["n_points"]) if worst else "-"
            rows.append(
                [
                    v["dataset"],
                    v["label"],
                    *[pct(cells[(v["vkey"], c)]["robust"]) if (v["vkey"], c) in cells else "-" for c in cols],
                    points,
                ]
            )
        sec.add(
            TextTable(
                f"Robust accuracy under L-inf eps {eps_text(eps)}",
                ["dataset", "model", *cols, "seeds, points"],
                rows,
            )
        )
    return sec.add(_autoattack_table(tables))


AUTOATTACK_TABLE = "AutoAttack against the rest of the suite"


def _autoattack_table(tables: Tables) -> TextTable:
    """Per model: the points only AutoAttack broke, by the component that broke them (the row's
    point_broken_by), the points only the rest broke, and suite_vs_autoattack's result."""
    labels = label_map(tables)
    rows = [
        [
            labels.get(g["vkey"], g["vkey"]),
            eps_text(g["eps"]),
            size(g["n_seeds"], g["n_points"]),
            g["autoattack_only"],
            g["components"] or "-",
            g["rest_only"],
            f"{100 * g['diff']:+.1f} ± {200 * g['se']:.1f}"
            if g["se"] == g["se"]
            else f"{100 * g['diff']:+.1f}",
            "pass" if g["passed"] else f"FAIL ({g['responsible']})",
        ]
        for g in tables.autoattack.iter_rows(named=True)
    ]
    headers = [
        "model",
        "L-inf eps",
        "points",
        "broken by AutoAttack only",
        "by component",
        "broken by the rest only",
        "difference, pp ± 2 SE",
        "suite_vs_autoattack",
    ]
    caption = (
        "Points AutoAttack broke that no other L-inf attack of the model's suite broke, by the AutoAttack"
        " component that broke them, and the reverse; suite_vs_autoattack fails when AutoAttack breaks more"
        " than the rest by over 2 standard errors (paired on the shared points, seeds pooled)."
    )
    return TextTable(AUTOATTACK_TABLE, headers, rows, caption)


def sequential_section(root: Path) -> Section | None:
    """A sequential launch's looks and decisions (RESULTS/decisions.json, decide.py), or None."""
    path = root / DECISIONS_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    sec = Section("Sequential decisions")
    looks = record["looks"]
    if record.get("unit") == "seeds":
        grew = (
            f"The seeds grew in looks: {', '.join(str(x['seeds']) for x in looks)} seeds run (at"
            f" {looks[-1]['points']} points per seed), of {', '.join(map(str, record['planned_looks']))}"
            f" planned (at most {record['max_seeds']}); the question is the training procedure (seeds are the unit)"
        )
    else:
        grew = (
            f"The attack set grew in looks of whole shards: {', '.join(str(x['points']) for x in looks)} points"
            f" per seed run, of {', '.join(map(str, record['planned_looks']))} planned (at most"
            f" {record['max_points']})"
        )
    sec.add(
        f"{grew}, margin ±{100 * record['margin']:.1f} pp. Method: {record['method']}. Each interval is the repeated"
        " confidence interval of the look its decision was taken at (the last look for one still open):"
        " it holds at every look at once, so looking after every wave does not inflate false decisions."
        + (
            f" Holm's family: the {looks[-1]['holm_family']} comparison(s) of the report's verdicts, the same"
            " family as their Holm-adjusted p in the verdicts' table; one not judged at a look (a side"
            " lacking points) counts as not rejected."
            if "holm_family" in looks[-1]
            else ""
        )
    )
    unit = "seeds" if record.get("unit") == "seeds" else "points per seed"
    rows = [
        [
            d["dataset"],
            d["a"],
            d["b"],
            d["decision"],
            "-" if d["look"] is None else f"{d['look'] + 1} ({d['points']} {unit})",
            f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
            f"{d['level']:.3g}",
        ]
        for d in looks[-1]["decisions"]
    ]
    headers = ["dataset", "model", "vs", "decision", "taken at look", "difference, pp [repeated CI]", "level"]
    return sec.add(TextTable("Decisions per comparison", headers, rows, "", badges="decision"))
