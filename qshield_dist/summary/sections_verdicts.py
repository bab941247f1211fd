"""The report's sections of the paired judgements: verdicts, worst-case robust accuracy, controls.

Each formats what paired.py and verdicts.py judged: every hybrid against its dataset's CNN
baseline, robust accuracy on the shared attack set under the worst case of the L-inf attacks,
and where a hybrid's gain comes from (its controls). The other sections are in sections.py.
"""

from __future__ import annotations

import json

import polars as pl

from qshield_dist.summary.render import Section, TextTable, pct
from qshield_dist.summary.sections import label_map
from qshield_dist.summary.tables import Tables
from qshield_dist.summary.verdicts import comparison_text, eps_text, gain_sources


def verdict_section(tables: Tables) -> Section:
    sec = Section("Verdicts")
    sec.add(
        "One line per HQCNN variant against its dataset's CNN baseline. Both answer on the same test"
        " points (the shared attack set); a point counts as robust when it is classified correctly clean"
        " and no L-inf attack at that budget broke it (the worst case over the attacks both models got,"
        " plus the BPDA attacks only a model with a hidden gradient gets;"
        " for a stochastic model an attack breaks a point when it is misclassified in a strict majority of"
        " that attack's evaluations). The verdict comes from the 95% interval of the paired difference,"
        f" never from the point estimate: more robust (above 0) / less robust (below 0), each also needing"
        f" the Holm-adjusted McNemar p < 0.05 over this report's comparisons; equal (inside ±{100 * tables.margin:g} pp);"
        " undecided otherwise. Provisional: a model's worst case lacks AutoAttack at its authors' strength in"
        " the form that model needs (standard on a deterministic model, rand on a stochastic one, through BPDA"
        " where the quantum branch's gradient is detached); the verdict names what it lacks. Failed diagnostics"
        " of either model (suite_vs_autoattack, restart_sensitivity, ...) are named beside it."
    )
    sec.add(sanity_text(tables))
    if not tables.verdicts.height:
        sec.add("No HQCNN variant in these results.")
    sec.add(*[f"- {v}" for v in tables.verdicts["verdict"]])
    return sec


def sanity_text(tables: Tables) -> str:
    """AutoAttack's own sanity checks, said before any verdict."""
    checks = tables.diagnostics.filter(pl.col("diagnostic") == "autoattack_sanity")
    if not checks.height:
        return "AutoAttack's sanity checks: no AutoAttack row in these results."
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


def worst_case_section(tables: Tables) -> Section:
    sec = Section("Worst-case robust accuracy")
    w = tables.worst_case
    if not w.height:
        sec.add("No per-point outcomes in these results (attack rows older than the shared attack set?).")
        return sec
    sec.add(
        "Robust accuracy on the shared attack set (correct clean and not broken), in percent, per L-inf"
        " attack and under all of them at once, point by point (worst case); mean over seeds."
        " [s = seeds, n = points per seed]. Minimum-norm (C&W, DeepFool: L2) and One-Pixel (L0) attacks are"
        " in the robustness table, never mixed into this worst case."
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
            size = f"s={worst['n_seeds']}, n={worst['n_points']}" if worst else "-"
            rows.append(
                [
                    v["dataset"],
                    v["label"],
                    *[pct(cells[(v["vkey"], c)]["robust"]) if (v["vkey"], c) in cells else "-" for c in cols],
                    size,
                ]
            )
        sec.add(
            TextTable(
                f"Robust accuracy under L-inf eps {eps_text(eps)}",
                ["dataset", "model", *cols, "seeds, points"],
                rows,
            )
        )
    return sec


def controls_section(tables: Tables) -> Section:
    sec = Section("Controls: where does the gain come from?")
    c = tables.controls
    gains = gain_sources(tables.paired, tables.margin)
    if not c.height and not gains.height:
        sec.add(
            "No control rows (control 'backbone_only' or 'equal_budget'):"
            " the gain cannot be attributed to the quantum branch or the backbone."
        )
        return sec
    labels = label_map(tables)
    sec.add(
        "backbone alone = the hybrid's own trained backbone with the quantum branch removed;"
        " equal-budget backbone = the backbone architecture trained alone for as many steps as the hybrid got."
        " Where the gain comes from is judged from paired intervals of worst-case robust accuracy:"
        " the quantum part (hybrid vs its backbone alone; it includes the fusion head) and the backbone part"
        " (backbone alone vs the CNN). A part is a gain when its verdict is 'more robust' and no gain when its"
        f" whole interval lies below +{100 * tables.margin:g} pp; where an interval leaves it open, the answer is undecided."
    )
    for g in gains.iter_rows(named=True):
        lines = [
            f"- **{labels.get(g['vkey_h'], g['vkey_h'])}** (L-inf eps {eps_text(g['eps'])}): gain mainly from"
            f" **{g['source']}**."
        ]
        for r in tables.paired.filter(
            (pl.col("hybrid") == g["vkey_h"]) & (pl.col("eps") == g["eps"]) & (pl.col("kind") != "vs CNN")
        ).iter_rows(named=True):
            lines.append(f"  - {r['kind']}: {comparison_text(r, labels)}")
        sec.add("\n".join(lines))
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
                f"s={r['n_seeds']}, n={r['n_attacked']}",
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
