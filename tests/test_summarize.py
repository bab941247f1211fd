"""Summary of a results directory: exact numbers in the tables, and every bad input -> exit 2.

The synthetic directory is written with qshield_dist's ResultStore.write, so the schema is
the real one. "Exact" means equal to the arithmetic done by hand, up to float rounding
(rel 1e-12). Standard deviations are SAMPLE standard deviations (ddof=1).
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qshield_dist.results.current import ATTACK_VERSION, STAGE_VERSIONS
from qshield_dist.results.schema import SCHEMA_VERSION, rows_to_table
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.summary.cli import default_out, main
from qshield_dist.summary.render import tex_escape
from qshield_dist.summary.report import Options, Summary, summarize

REPO = Path(__file__).resolve().parents[1]
EXACT = {"rel": 1e-12, "abs": 1e-15}
EPS = 32 / 255
FGSM = json.dumps({"eps": EPS}, sort_keys=True)
PGD = json.dumps({"alpha": 2 / 255, "eps": EPS, "random_start": True, "steps": 10}, sort_keys=True)
HYBRID = {
    "backbone": "cnn",
    "entanglement": "full",
    "depth": 1,
    "encoding": "enhanced_angle",
    "noise_model": "mixed",
    "noise_strength": 0.005,
    "fusion": "dynamic",
    "quantum_grad": "full",
    "projection": "learned",
    "init": "from_baseline",
    "simulator": "compiled",
    "device": "default.mixed",
    "trajectories": 0,
    "qubits": 4,
}


def _train(
    dataset: str, model: str, seed: int, clean: float, seconds: float, sweep: str = "t", **cols: Any
) -> dict[str, Any]:
    return {
        "sweep": sweep,
        "stage": "train",
        "status": "ok",
        "trial_id": f"T{dataset}{model}{cols.get('entanglement', '')}{seed}",
        "dataset": dataset,
        "model": model,
        "variant": model,
        "seed": seed,
        "clean_acc": clean,
        "train_seconds": seconds,
        "train_steps": 100,
        **cols,
    }


def _attack(
    dataset: str,
    model: str,
    attack: str,
    seed: int,
    n: int,
    succ: int,
    seconds: float,
    fwd: int,
    bwd: int,
    params: str = FGSM,
    sweep: str = "t",
    **cols: Any,
) -> dict[str, Any]:
    asr = succ / n if n else float("nan")
    return {
        "sweep": sweep,
        "stage": "attack",
        "status": "ok",
        "trial_id": f"A{dataset}{model}{cols.get('entanglement', '')}{cols.get('control') or ''}{attack}{seed}",
        "train_id": f"T{dataset}{model}{seed}",
        "dataset": dataset,
        "model": model,
        "variant": model,
        "seed": seed,
        "attack": attack,
        "attack_preset": "paper",
        "attack_params": params,
        "threat_model": "linf",
        "eps": EPS,
        "eval_repeats": 1,
        "success_rule": "misclassified (deterministic model, 1 evaluation)",
        "stochastic": False,
        "clean_acc": 0.9,
        "n_points": n,
        "n_attacked": n,
        "n_success": succ,
        "asr": asr,
        "asr_worst": asr,
        "robust_acc": 0.9 * (1 - asr),
        "attack_seconds": seconds,
        "forward_calls": fwd,
        "backward_calls": bwd,
        "forward_samples": fwd * 50,
        "backward_samples": bwd * 50,
        "budget_ok": True,
        **cols,
    }


def _write(root: Path, row: dict[str, Any]) -> None:
    """The store writes a failure row to `<id>.failed.parquet` by its status."""
    row = {"results_version": STAGE_VERSIONS[row["stage"]], "train_version": STAGE_VERSIONS["train"], **row}
    ResultStore(root).write(TrialKey(row["stage"], row["dataset"], row["trial_id"]), [row])


def build_results(root: Path) -> None:
    """mnist: cnn baseline, hqcnn-full, its backbone-only control; digits: cnn_small and a
    hybrid with a thin seed, a NaN row and a failed trial; a diagnostic; a manifest."""
    rows = [
        _train("mnist", "cnn", 0, 0.99, 10.0),
        _train("mnist", "cnn", 1, 0.97, 30.0),
        _train("mnist", "hqcnn", 0, 0.95, 100.0, **HYBRID),
        _train("mnist", "hqcnn", 1, 0.97, 300.0, **HYBRID),
        # cnn: fgsm ASR 0.5, 0.7; 4 s over 200 samples; 40 calls
        _attack("mnist", "cnn", "fgsm", 0, 100, 50, 1.0, 10, 10),
        _attack("mnist", "cnn", "fgsm", 1, 100, 70, 3.0, 10, 10),
        _attack("mnist", "cnn", "pgd", 0, 100, 80, 2.0, 10, 10, PGD),
        _attack("mnist", "cnn", "pgd", 1, 100, 80, 2.0, 10, 10, PGD),
        # hybrid: fgsm ASR 0.3, 0.4; 400 s over 200 samples; 80 calls
        _attack("mnist", "hqcnn", "fgsm", 0, 100, 30, 100.0, 20, 20, **HYBRID),
        _attack("mnist", "hqcnn", "fgsm", 1, 100, 40, 300.0, 20, 20, **HYBRID),
        _attack("mnist", "hqcnn", "pgd", 0, 100, 90, 100.0, 20, 20, PGD, **HYBRID),
        _attack("mnist", "hqcnn", "pgd", 1, 100, 90, 100.0, 20, 20, PGD, **HYBRID),
        _attack("mnist", "hqcnn", "bpda_pgd", 0, 100, 95, 100.0, 20, 20, PGD, **HYBRID),
        _attack("mnist", "hqcnn", "bpda_pgd", 1, 100, 95, 100.0, 20, 20, PGD, **HYBRID),
        # the hybrid's own backbone, quantum branch removed: fgsm ASR 0.55
        _attack("mnist", "hqcnn", "fgsm", 0, 100, 55, 1.0, 10, 10, control="backbone_only", **HYBRID),
        _attack("mnist", "hqcnn", "fgsm", 1, 100, 55, 1.0, 10, 10, control="backbone_only", **HYBRID),
        _train("digits", "cnn_small", 0, 0.9, 5.0),
        _attack("digits", "cnn_small", "fgsm", 0, 50, 25, 1.0, 5, 5),
        _train(
            "digits", "hqcnn", 0, 0.8, 50.0, **{**HYBRID, "backbone": "cnn_small", "entanglement": "linear"}
        ),
        _attack(
            "digits",
            "hqcnn",
            "fgsm",
            0,
            10,
            2,
            10.0,
            5,
            5,
            **{**HYBRID, "backbone": "cnn_small", "entanglement": "linear"},
        ),  # thin seed
        {
            **_attack(
                "digits",
                "hqcnn",
                "pgd",
                0,
                0,
                0,
                1.0,
                5,
                5,
                PGD,
                **{**HYBRID, "backbone": "cnn_small", "entanglement": "linear"},
            )
        },  # NaN ASR
    ]
    for row in rows:
        _write(root, row)
    diag = {
        "sweep": "t",
        "stage": "diagnostic",
        "status": "ok",
        "trial_id": "Dmnist0",
        "dataset": "mnist",
        "model": "hqcnn",
        "seed": 0,
        "diagnostic": "grad_norm_ratio",
        "diagnostic_value": 0.5,
        "diagnostic_pass": False,
        "details": '{"why": "test"}',
        **HYBRID,
    }
    _write(root, diag)
    failed = {
        "sweep": "t",
        "stage": "attack",
        "status": "failed",
        "trial_id": "Afail",
        "dataset": "digits",
        "model": "hqcnn",
        "variant": "hqcnn",
        "seed": 0,
        "attack": "square",
        "error": "RuntimeError: simulator exploded\nTraceback (most recent call last): ...",
        **{**HYBRID, "backbone": "cnn_small", "entanglement": "linear"},
    }
    _write(root, failed)
    expected = [r["trial_id"] for r in rows] + ["Dmnist0", "Afail", "Anever"]
    ResultStore(root).write_manifest(
        {"sweep": "t"}, {t: {"stage": "attack", "dataset": "digits"} for t in expected}
    )


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> Summary:
    root = tmp_path_factory.mktemp("res") / "results"
    build_results(root)
    return summarize(root, root.parent / "report", Options(plots=True, svg=False, proxies={}))


def _cell(s: Summary, dataset: str, model: str, attack: str) -> dict[str, Any]:
    rob = s.tables.robustness.filter(
        (pl.col("dataset") == dataset)
        & (pl.col("model") == model)
        & pl.col("control").is_null()
        & (pl.col("attack_label") == attack)
    )
    assert rob.height == 1, rob
    return s.tables.cost.filter(pl.col("vkey") == rob["vkey"][0], pl.col("attack_label") == attack).row(
        0, named=True
    )


def test_robustness_means_and_sample_std(summary: Summary) -> None:
    cnn = _cell(summary, "mnist", "cnn", "fgsm")
    assert cnn["asr_mean"] == pytest.approx(0.6, **EXACT)
    assert cnn["asr_std"] == pytest.approx(math.sqrt(0.02), **EXACT)  # ddof=1: ((0.1)^2 + (0.1)^2) / (2 - 1)
    assert (cnn["n_seeds"], cnn["n_attacked"]) == (2, 200)
    hyb = _cell(summary, "mnist", "hqcnn", "fgsm")
    assert hyb["asr_mean"] == pytest.approx(0.35, **EXACT)
    assert hyb["asr_std"] == pytest.approx(math.sqrt(0.005), **EXACT)
    assert hyb["robust_mean"] == pytest.approx(0.9 * 0.65, **EXACT)
    pgd = _cell(summary, "mnist", "cnn", "pgd")
    assert pgd["asr_std"] == 0.0
    single = _cell(summary, "digits", "cnn_small", "fgsm")
    assert single["asr_std"] is None  # one seed: no sample std
    clean = summary.tables.clean.join(summary.tables.variants.select("vkey", "dataset", "model"), on="vkey")
    c = clean.filter((pl.col("dataset") == "mnist") & (pl.col("model") == "cnn")).row(0, named=True)
    assert c["clean_mean"] == pytest.approx(0.98, **EXACT) and c["clean_std"] == pytest.approx(
        math.sqrt(0.0002), **EXACT
    )
    assert c["clean_attack_set"] == pytest.approx(0.9, **EXACT)  # the attack shards' own, beside it
    clean = summary.tables.clean.join(summary.tables.variants.select("vkey", "control"), on="vkey")
    ctrl = clean.filter(pl.col("control") == "backbone_only").row(0, named=True)
    assert ctrl["clean_source"] == "attack rows" and ctrl["clean_mean"] == pytest.approx(0.9, **EXACT)


def test_cost_per_sample_and_exact_decomposition(summary: Summary) -> None:
    cnn = _cell(summary, "mnist", "cnn", "fgsm")
    assert cnn["sec_per_sample"] == pytest.approx(4.0 / 200, **EXACT)
    assert cnn["calls_per_sample"] == pytest.approx(40 / 200, **EXACT)
    assert cnn["fwd_evals_per_sample"] == pytest.approx(1000 / 200, **EXACT)
    hyb = _cell(summary, "mnist", "hqcnn", "fgsm")
    assert hyb["baseline"] == "cnn"
    assert hyb["time_ratio"] == pytest.approx(100.0, **EXACT)  # (400/200) / (4/200)
    assert hyb["calls_ratio"] == pytest.approx(2.0, **EXACT)  # (80/200) / (40/200)
    assert hyb["per_call_ratio"] == pytest.approx(50.0, **EXACT)  # (400/80) / (4/40)
    assert hyb["time_ratio"] == pytest.approx(hyb["calls_ratio"] * hyb["per_call_ratio"], **EXACT)
    assert hyb["cost_driver"] == "time per call (model/simulator)"
    assert hyb["calls_share"] == pytest.approx(math.log(2) / math.log(100), **EXACT)
    models = dict(zip(summary.tables.variants["vkey"], summary.tables.variants["model"]))
    assert {d: models[v] for d, v in summary.tables.baselines.items()} == {
        "digits": "cnn_small",
        "mnist": "cnn",
    }
    assert any("baseline is 'cnn_small'" in n for n in summary.tables.notes)


def test_verdict_says_what_it_does_not_cover(summary: Summary) -> None:
    """These synthetic rows carry no per-point outcomes: no paired verdict, and it says so
    (tests/test_verdicts.py covers the verdicts themselves)."""
    d = summary.tables.verdicts.filter(pl.col("dataset") == "mnist").row(0, named=True)
    assert d["category"] == "no comparison" and "no verdict" in d["verdict"]


def test_controls_attribute_the_gain(summary: Summary) -> None:
    c = summary.tables.controls.row(0, named=True)
    assert c["asr_backbone_only"] == pytest.approx(0.55, **EXACT)
    assert c["gain_backbone"] == pytest.approx(0.6 - 0.55, **EXACT)
    assert c["gain_quantum"] == pytest.approx(0.55 - 0.35, **EXACT)
    assert "source" not in c  # where the gain comes from is judged from intervals (test_verdicts.py)


def test_paper_comparison(summary: Summary) -> None:
    p = summary.paper

    def row(model: str, metric: str, attack: str) -> dict[str, Any]:
        return p.filter(
            (pl.col("dataset") == "mnist")
            & (pl.col("paper_model") == model)
            & (pl.col("metric") == metric)
            & (pl.col("attack") == attack)
        ).row(0, named=True)

    acc = row("HQCNN-full", "accuracy", "")
    assert acc["paper"] == pytest.approx(0.9906, **EXACT) and acc["diff"] == pytest.approx(
        0.96 - 0.9906, **EXACT
    )
    assert "backbone" not in acc["notes"] and "projection=learned" in acc["notes"]
    fgsm = row("CNN", "asr", "fgsm")
    assert fgsm["paper"] == pytest.approx(0.4729, **EXACT) and fgsm["diff"] == pytest.approx(
        0.6 - 0.4729, **EXACT
    )
    assert fgsm["match"] == "exact"
    t = row("HQCNN-full", "attack_time_ratio_vs_cnn", "fgsm")
    assert t["paper"] == pytest.approx(214.59 / 3.22, **EXACT) and t["diff"] == pytest.approx(
        100 - 214.59 / 3.22, **EXACT
    )
    tr = row("HQCNN-full", "train_time_ratio_vs_cnn", "")
    assert tr["measured"] == pytest.approx(200 / 20, **EXACT) and tr["paper"] == pytest.approx(
        13049.79 / 194.95, **EXACT
    )
    assert row("HQCNN-full", "asr", "bpda_pgd")["match"].startswith("no counterpart")
    assert (
        p.filter((pl.col("dataset") == "digits") & pl.col("match").str.contains("not in the paper")).height
        > 0
    )
    assert row("DNN", "asr", "square")["match"] == "not measured here"


def test_honesty_section(summary: Summary) -> None:
    t = summary.tables
    assert t.failed.height == 1 and "simulator exploded" in t.failed["error"][0]
    assert t.missing["trial_id"].to_list() == ["Anever"]
    assert t.low_samples["n_attacked"].to_list() == [10]
    assert t.skipped.height == 1 and "n_attacked = 0" in t.skipped["reason"][0]
    d = t.diagnostics.row(0, named=True)
    assert (d["diagnostic"], d["n_pass"], d["n"]) == ("grad_norm_ratio", 0, 1)


def test_outputs_written(summary: Summary) -> None:
    out = summary.results.root.parent / "report"
    md = (out / "report.md").read_text()
    for text in ("60.00 ± 14.14 [s=2, n=200]", "simulator exploded", "Missing grid points", "†", "FAIL"):
        assert text in md, text
    tex = (out / "tables.tex").read_text()
    assert r"\toprule" in tex and r"$\pm$" in tex and r"\_" in tex
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<details>" in html
    rob = pl.read_csv(out / "robustness.csv")
    assert rob.filter((pl.col("model") == "cnn") & (pl.col("attack_label") == "fgsm"))["asr_mean"][
        0
    ] == pytest.approx(0.6, **EXACT)
    names = {f.name for f in summary.figures}
    assert {"asr_mnist", "attack_time_mnist", "clean_vs_robust_mnist"} <= names
    assert (out / "plots" / "asr_mnist.png").stat().st_size > 1000
    plot_notes = [
        b for s in summary.sections if s.title == "Robustness" for b in s.blocks if isinstance(b, str)
    ]
    assert any("figure ASR vs depth (mnist): skipped" in n for n in plot_notes)
    # one seed: the value and n, no "± n/a" and no "s=1"
    assert "| cnn_small | 90.00 | 50.00 [n=50] | 45.00 |" in md
    assert "± n/a" not in md and not re.search(r"\bs=1\b", md)


def test_pivot_and_tex_escape(tmp_path: Path) -> None:
    root = tmp_path / "results"
    build_results(root)
    s = summarize(root, tmp_path / "rep", Options(plots=False, pivot=True, formats=("md",)))
    table = next(t for sec in s.sections for t in sec.tables if t.title == "Robustness - mnist")
    assert table.headers[:2] == ["attack", "model"]
    assert not (tmp_path / "rep" / "tables.tex").exists()
    assert tex_escape("a_b & 5% -> x") == r"a\_b \& 5\% $\rightarrow$ x"


# ------------------------------------------------------------------ bad input -> exit 2
def test_missing_dir_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "summarize.py"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def _run(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(argv)
    return code, caplog.text


def test_empty_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, text = _run([str(tmp_path), "--out", str(tmp_path / "r")], caplog)
    assert code == 2 and "no result files" in text


def test_other_schema_version_is_set_aside_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file of the grid written before a schema change is set aside, counted and named by reason."""
    build_results(tmp_path)
    table = rows_to_table([_train("mnist", "cnn", 5, 0.9, 1.0)])
    table = table.set_column(0, "schema_version", pa.array([1], pa.int32()))
    store = ResultStore(tmp_path)
    pq.write_table(table, store.flat_path(TrialKey("train", "mnist", "Tv1")))  # an old file: flat layout
    _, trials = store.read_manifest()
    store.write_manifest({"sweep": "t"}, {**trials, "Tv1": {"stage": "train", "dataset": "mnist"}})
    summary = summarize(tmp_path, tmp_path / "r", Options(plots=False, proxies={}))
    assert summary.results.set_aside == {f"schema version 1 (current {SCHEMA_VERSION})": 1}
    assert 5 not in summary.results.train["seed"].to_list()
    assert (
        "1 result row(s) set aside, not summarized: 1 schema version 1"
        in (tmp_path / "r" / "report.md").read_text()
    )


def test_foreign_schema_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without a manifest there is no grid to filter by: a file of another schema is still set aside."""
    build_results(tmp_path)
    (tmp_path / "manifest.json").unlink()
    path = ResultStore(tmp_path).flat_path(TrialKey("attack", "mnist", "Aold"))
    pq.write_table(
        pa.table({"schema_version": pa.array([0], pa.int32()), "sweep": ["t"], "asr": [0.5]}), path
    )
    summary = summarize(tmp_path, tmp_path / "r", Options(plots=False, proxies={}))
    assert summary.results.set_aside == {f"schema version 0 (current {SCHEMA_VERSION})": 1}


def test_rows_outside_the_grid_and_of_other_versions_are_set_aside(tmp_path: Path) -> None:
    """Only the manifest's grid at the current versions is summarized; the rest is counted by reason."""
    build_results(tmp_path)
    _write(tmp_path, _attack("mnist", "cnn", "fgsm", 7, 100, 1, 1.0, 1, 1))  # not in the manifest
    old = rows_to_table([_attack("mnist", "cnn", "fgsm", 8, 100, 1, 1.0, 1, 1)])
    old = old.set_column(
        old.schema.get_field_index("results_version"),
        "results_version",
        pa.array([ATTACK_VERSION - 1], pa.int32()),
    )
    pq.write_table(old, ResultStore(tmp_path).flat_path(TrialKey("attack", "mnist", "Aolder")))
    summary = summarize(tmp_path, tmp_path / "r", Options(plots=False, proxies={}))
    assert summary.results.set_aside == {
        "not in this sweep's grid": 1,
        f"attack version {ATTACK_VERSION - 1} (current {ATTACK_VERSION})": 1,
    }
    seeds = summary.results.attack.select("seed").collect()["seed"].to_list()
    assert 7 not in seeds and 8 not in seeds


def test_mixed_sweeps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without a manifest, rows of two sweeps are not mixed silently: --sweep picks one."""
    build_results(tmp_path)
    (tmp_path / "manifest.json").unlink()
    _write(tmp_path, _attack("mnist", "cnn", "fgsm", 7, 100, 1, 1.0, 1, 1, sweep="other"))
    code, text = _run([str(tmp_path), "--out", str(tmp_path / "r"), "--no-plots"], caplog)
    assert code == 2 and "--sweep NAME" in text and "other (1 rows)" in text
    code, text = _run([str(tmp_path), "--out", str(tmp_path / "r"), "--no-plots", "--sweep", "t"], caplog)
    assert code == 0
    code, text = _run([str(tmp_path), "--out", str(tmp_path / "r"), "--no-plots", "--sweep", "zzz"], caplog)
    assert code == 2 and "sweeps found: other, t" in text


def test_only_nan_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, _attack("mnist", "cnn", "fgsm", 0, 0, 0, float("nan"), 1, 1))
    code, text = _run([str(tmp_path), "--out", str(tmp_path / "r")], caplog)
    assert code == 2 and "nothing to summarize" in text and "NaN" in text


def test_bad_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_results(tmp_path)
    code, text = _run([str(tmp_path), "--format", "md,pdf"], caplog)
    assert code == 2 and "allowed formats" in text
    code, text = _run([str(tmp_path), "--bogus"], caplog)
    assert code == 2 and "unrecognized arguments" in text


def test_default_report_dir() -> None:
    assert default_out(Path("results/quick")) == Path("reports/quick")


def test_a_seeds_shards_are_joined_and_a_duplicate_shard_is_flagged(tmp_path: Path) -> None:
    """Shards of one seed make one seed (ASR and robust accuracy over all their points, not a
    spread over shards); a second row of one shard is listed as a duplicate."""
    from qshield_dist.summary.load import load_results
    from qshield_dist.summary.tables import build_tables

    for trial_id, n, succ, shard in (("As0", 40, 10, 0), ("As1", 60, 30, 1)):
        _write(
            tmp_path, _attack("mnist", "cnn", "fgsm", 0, n, succ, 1.0, 1, 1, trial_id=trial_id, shard=shard)
        )
    cell = build_tables(load_results(tmp_path)).robustness.row(0, named=True)
    assert (cell["n_seeds"], cell["n_shards"], cell["n_rows"], cell["n_attacked"]) == (1, 2, 2, 100)
    assert cell["asr_mean"] == pytest.approx(40 / 100, **EXACT) and cell["asr_std"] is None
    assert cell["robust_mean"] == pytest.approx((0.9 * 0.75 * 40 + 0.9 * 0.5 * 60) / 100, **EXACT)

    _write(tmp_path, _attack("mnist", "cnn", "fgsm", 0, 60, 30, 1.0, 1, 1, trial_id="As1again", shard=1))
    duplicates = build_tables(load_results(tmp_path)).duplicates
    assert duplicates.select("n_rows", "n_shards").rows() == [(3, 2)]


def test_a_seed_that_attacked_nothing_leaves_the_asr_defined(tmp_path: Path) -> None:
    """A shard whose every point is wrong clean attacks nothing (its ASR is NaN). Its seed adds
    nothing to the cell's ASR, which stays the other seed's (main had NaN for the whole cell);
    a cell where no seed attacked a point has no ASR (null, not NaN) and says why."""
    from qshield_dist.summary.load import load_results
    from qshield_dist.summary.report import Options, summarize
    from qshield_dist.summary.tables import build_tables

    nothing = {"n_attacked": 0, "n_success": 0, "asr": float("nan"), "asr_worst": float("nan")}
    nothing |= {"robust_acc": 0.0, "clean_acc": 0.0}
    for trial_id, n, succ, shard in (("As0", 40, 10, 0), ("As1", 60, 30, 1)):
        _write(
            tmp_path, _attack("mnist", "cnn", "fgsm", 0, n, succ, 1.0, 1, 1, trial_id=trial_id, shard=shard)
        )
    _write(tmp_path, _attack("mnist", "cnn", "fgsm", 1, 40, 0, 1.0, 1, 1, trial_id="Bs0", shard=0, **nothing))
    _write(tmp_path, _attack("mnist", "cnn", "pgd", 0, 40, 0, 1.0, 1, 1, trial_id="Cs0", shard=0, **nothing))
    cells = {r["attack"]: r for r in build_tables(load_results(tmp_path)).robustness.iter_rows(named=True)}
    fgsm, pgd = cells["fgsm"], cells["pgd"]
    assert (fgsm["n_seeds"], fgsm["n_seeds_asr"], fgsm["n_attacked"]) == (2, 1, 100)
    assert fgsm["asr_mean"] == pytest.approx(40 / 100, **EXACT) and fgsm["asr_std"] is None
    assert fgsm["robust_mean"] == pytest.approx(((0.9 * 0.75 * 40 + 0.9 * 0.5 * 60) / 100 + 0) / 2, **EXACT)
    assert pgd["asr_mean"] is None and pgd["asr_worst_mean"] is None and pgd["n_seeds_asr"] == 0
    summarize(tmp_path, tmp_path / "r", Options(plots=False, formats=("md",), proxies={}))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| 40.00 [s=2, n=100]" in md and "- (nothing attacked: no point correct clean) [n=0]" in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "nan" in line.lower()]
