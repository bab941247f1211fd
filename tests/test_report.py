"""The report's layout on a small fixture (tests/report_fixture.py): the same numbers as before
its redesign, the verdicts as a table whose cells show what the judgement says (including the
columns it adds only when it has something to say), and the controls in sentences."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import polars as pl
import pytest
from report_fixture import normalised

from qshield_dist.summary.html_page import render_html
from qshield_dist.summary.render import TextTable
from qshield_dist.summary.report import Options, Summary, summarize
from qshield_dist.summary.sections_verdicts import (
    CONTROL_TABLE,
    VERDICT_TABLE,
    controls_section,
    verdict_section,
)
from qshield_dist.summary.verdicts import gain_text

GOLDEN = Path(__file__).parent / "golden" / "report"
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
# Numbers the new report says and the old one did not, each with why.
NEW_NUMBERS = {"0.8": "the power behind 'to resolve', now said once in 'How to read this'"}


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> Summary:
    from report_fixture import build

    root = tmp_path_factory.mktemp("report")
    build(root / "results")
    return summarize(root / "results", root / "report", Options(formats=("md", "csv", "html"), svg=False))


def _out(summary: Summary) -> Path:
    return summary.results.root.parent / "report"


def _table(summary: Summary, title: str) -> list[dict[str, str]]:
    (table,) = [t for sec in summary.sections for t in sec.tables if t.title == title]
    return [dict(zip(table.headers, r)) for r in table.rows]


def test_same_numbers_as_before_the_redesign(summary: Summary) -> None:
    """tests/golden/report/ is what main 49c6f05 wrote for this fixture (report_fixture.py's
    command). Every CSV keeps its columns and the numbers in each of their cells (columns may
    be added); the Markdown holds the same set of numbers (the old one repeated some)."""
    out = _out(summary)
    for golden in sorted(GOLDEN.glob("*.csv")):
        old = pl.read_csv(golden, infer_schema=False)
        new = pl.read_csv(out / golden.name, infer_schema=False)
        assert new.columns[: old.width] == old.columns, golden.name
        # Some frames come from a group_by without an order: compare their rows as a sorted list.
        old, new = old.sort(old.columns, nulls_last=True), new.sort(old.columns, nulls_last=True)
        for column in old.columns:
            numbers = [NUMBER.findall(x or "") for x in old[column]]
            assert [NUMBER.findall(x or "") for x in new[column]] == numbers, (golden.name, column)
    old_md = set(NUMBER.findall((GOLDEN / "report.md").read_text()))
    new_md = set(NUMBER.findall(normalised((out / "report.md").read_text(), summary.results.root)))
    assert old_md - new_md == set()
    assert new_md - old_md == set(NEW_NUMBERS)


def test_the_report_opens_with_the_verdict_table_and_its_forest_plot(summary: Summary) -> None:
    verdicts = summary.sections[0]
    assert verdicts.title == "Verdicts"
    assert isinstance(verdicts.blocks[0], TextTable) and verdicts.blocks[0].title == VERDICT_TABLE
    assert verdicts.blocks[1].name == "forest_vs_cnn"  # type: ignore[union-attr]
    assert (_out(summary) / "plots" / "forest_vs_cnn.png").stat().st_size > 10_000
    rows = {r["model"]: r for r in _table(summary, VERDICT_TABLE)}
    full = rows["hqcnn[cnn_small] full"]
    assert (full["vs"], full["robust acc %"], full["verdict"], full["points"]) == (
        "cnn_small",
        "35.0 vs 20.0",
        "more robust",
        "200",
    )
    assert full["difference, pp [95% CI]"] == "+15.0 [+10.0, +20.0]" and full["to resolve"] == "-"
    assert full["attacks (worst case)"] == "apgd[standard], fgsm, pgd"
    assert full["flags"] == "hqcnn[cnn_small] full: grad_norm_ratio"  # its failed diagnostic
    star = rows["hqcnn[cnn_small] star"]
    assert star["verdict"] == "undecided" and star["to resolve"] == "≈ 257 points per seed"
    assert star["flags"].startswith("not covered: 1 failed trial(s)")
    mnist = rows["hqcnn[cnn] full"]
    assert mnist["verdict"] == "undecided · provisional" and mnist["points"] == "100 × 2 seeds"
    assert mnist["difference, pp [95% CI]"] == "+2.5 [-2.0, +8.0]; per seed +6.0%, -1.0%"
    assert mnist["attacks (worst case)"] == "fgsm, pgd; no full-strength attack"
    html = (_out(summary) / "report.html").read_text()
    assert html.count("How to read this") == 1
    assert "<span class='badge undecided'>undecided</span><span class='badge provisional'>" in html


def test_no_noise(summary: Summary) -> None:
    md = (_out(summary) / "report.md").read_text()
    assert "± n/a" not in md and not re.search(r"\bs=1\b", md)
    assert "| cnn_small | 95.00 | 39.47 [n=190] | 57.50 |" in md  # one seed: the value and n
    assert "| cnn | 97.50 ± 0.71 [s=2] | 33.33 ± 1.43 [s=2, n=198] | 66.00 ± 1.41 |" in md
    assert "mainly from **undecided" not in md and "mainly from undecided" not in md
    # attack parameters once per dataset: in its attack-settings table
    assert md.count("alpha=2/255") == 2 and md.count("n_restarts=1") == 1


def test_controls_as_a_table_and_sentences(summary: Summary) -> None:
    md = (_out(summary) / "report.md").read_text()
    assert (
        "- **hqcnn[cnn_small] full** (L-inf eps 32/255): where the gain comes from is undecided (quantum part:"
        " more robust; backbone part: undecided; against the equal-budget backbone: more robust)." in md
    )
    assert "- **hqcnn[cnn_small] star** (L-inf eps 32/255): where the gain comes from cannot be said" in md
    rows = _table(summary, CONTROL_TABLE)
    assert [(r["comparison"], r["verdict"]) for r in rows] == [
        ("vs backbone alone", "more robust"),
        ("vs equal-budget backbone", "more robust"),
        ("backbone alone vs CNN", "undecided"),
        ("vs equal-budget backbone", "undecided"),
    ]
    assert rows[2]["model"] == "hqcnn[cnn_small] full [backbone_only]" and rows[2]["to resolve"].startswith(
        "≈"
    )


@pytest.mark.parametrize(
    "source,sentence",
    [
        ("both", "the gain comes from both the quantum branch and the backbone"),
        ("quantum branch", "the gain comes mainly from the quantum branch (with its fusion head)"),
        ("backbone", "the gain comes mainly from the backbone, not from the quantum branch"),
        ("no gain", "neither the quantum branch nor the backbone is a gain"),
        ("undecided", "where the gain comes from is undecided"),
        ("no backbone-alone run", "where the gain comes from cannot be said: there is no backbone-alone run"),
    ],
)
def test_every_gain_source_reads_as_a_sentence(source: str, sentence: str) -> None:
    g = {"source": source, "quantum": "more robust", "backbone": "undecided", "equal_budget": None}
    assert gain_text(g) == sentence + " (quantum part: more robust; backbone part: undecided)."
    g = {"source": source, "quantum": None, "backbone": None, "equal_budget": None}
    assert gain_text(g) == sentence + "."


def test_what_the_judgement_adds_is_shown(summary: Summary) -> None:
    """Columns the verdicts carry when they have something to say (`lacks`, `missing`, the
    category `incomplete`) and failed diagnostics with the component they name."""
    t = summary.tables
    mnist = pl.col("dataset") == "mnist"
    paired = t.paired.with_columns(
        lacks=pl.when(pl.col("provisional")).then(pl.lit("cnn: autoattack (standard)")),
        missing=pl.when(mnist).then(pl.lit("pgd on seed 1")),
        verdict=pl.when(mnist).then(pl.lit("incomplete")).otherwise("verdict"),
    )
    verdicts = t.verdicts.with_columns(
        lacks=pl.when(pl.col("provisional")).then(pl.lit("cnn: autoattack (standard)")),
        missing=pl.when(mnist).then(pl.lit("pgd on seed 1")),
        category=pl.when(mnist).then(pl.lit("incomplete")).otherwise("category"),
    )
    hybrids = t.variants.filter(pl.col("model") == "hqcnn").sort("label")
    full, star = (
        hybrids.filter(pl.col("label") == f"hqcnn[cnn_small] {e}")["vkey"][0] for e in ("full", "star")
    )
    flagged = pl.DataFrame(
        {
            "vkey": [full, star],
            "diagnostic": ["suite_vs_autoattack", "restart_sensitivity"],
            "n": [1, 1],
            "n_pass": [0, 0],
            "value_mean": [0.05, 0.04],
            "value_std": [None, None],
            "details": [
                json.dumps({"component": "apgd-t", "extra_broken": 12}),
                json.dumps({"spread": 0.04}),
            ],
        }
    )
    tables = dataclasses.replace(
        t,
        paired=paired,
        verdicts=verdicts,
        diagnostics=pl.concat([t.diagnostics, flagged], how="vertical_relaxed"),
    )
    section = verdict_section(tables, [])
    rows = {r[1]: dict(zip(section.tables[0].headers, r)) for r in section.tables[0].rows}
    assert rows["hqcnn[cnn] full"]["verdict"] == "incomplete · provisional"
    assert rows["hqcnn[cnn] full"]["attacks (worst case)"] == (
        "fgsm, pgd; lacks cnn: autoattack (standard); missing pgd on seed 1"
    )
    assert rows["hqcnn[cnn_small] full"]["flags"] == (
        "hqcnn[cnn_small] full: grad_norm_ratio; hqcnn[cnn_small] full: suite_vs_autoattack (apgd-t)"
    )
    assert rows["hqcnn[cnn_small] star"]["flags"].startswith(
        "hqcnn[cnn_small] star: restart_sensitivity; not"
    )
    controls = controls_section(tables, [])
    control_rows = [dict(zip(controls.tables[0].headers, r)) for r in controls.tables[0].rows]
    assert "suite_vs_autoattack (apgd-t)" in control_rows[0]["flags"]
    html = render_html("t", "stamp", [section], t.failed)
    assert "<span class='badge incomplete'>incomplete</span>" in html
