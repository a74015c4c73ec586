"""The benchmarks cannot rot: the GPU suite's smoke mode and the peers comparison run on the CPU.

``benchmarks/gpu_suite.sh --smoke`` runs every step of the GPU suite with tiny sizes;
``benchmarks/spectrum_vs_peers.py --smoke`` checks its own references (the exact trace from the
Gauss-Newton identity against the trace from all unit vectors, our float64 product against
curvlinops') and runs every installed peer. Peers that are not installed are reported as such and
their assertions skipped; this package's side always runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import BENCHMARKS, REPO_ROOT, load_benchmark

PEER_MODULES = {"pyhessian": "pyhessian", "curvlinops": "curvlinops", "eigenthings": "hessian_eigenthings"}


def load_peers_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_benchmark("spectrum_vs_peers", monkeypatch)


def installed(tool: str) -> bool:
    return importlib.util.find_spec(PEER_MODULES[tool]) is not None


def rows_by_tool(problem: dict, task: str) -> dict[str, dict]:
    return {row["tool"]: row for row in problem["tasks"][task]}


def check_peers_report(report: dict, model: str) -> None:
    """What every smoke report must show, whatever the machine's speed."""
    (problem,) = [p for p in report["results"] if p["name"] == model]
    assert problem["checks"]["trace_identity_rel_diff"] < 1e-9  # tr H = tr GGN for these networks
    if installed("curvlinops"):
        assert problem["checks"]["hvp_float64_vs_curvlinops"] < 1e-10
    eigenvalues = problem["reference"]["eigenvalues"]
    assert eigenvalues == sorted(eigenvalues, reverse=True) and len(eigenvalues) == 5
    ours = {task: rows_by_tool(problem, task)["ours"] for task in ("top5", "trace", "density")}
    assert ours["top5"]["status"] == "reached" and ours["top5"]["accuracy"] <= 1e-3
    assert ours["trace"]["status"] in ("reached", "not reached")  # never "failed"
    if ours["trace"]["status"] == "reached":
        assert ours["trace"]["accuracy"] <= 0.02
    assert ours["density"]["status"] == "reached" and ours["density"]["hvps"] == 4 * 32
    for tool in PEER_MODULES:
        for task in ("top5", "trace", "density"):
            row = rows_by_tool(problem, task)[tool]
            if not installed(tool):
                assert row["status"] == "not installed"
            else:
                assert row["status"] in ("reached", "not reached", "failed"), row
                if row["status"] == "reached" and task != "density":
                    assert row["accuracy"] <= {"top5": 1e-3, "trace": 0.02}[task]
    if installed("eigenthings"):  # a Lanczos with full reorthogonalisation reaches 1e-3 on 746 parameters
        assert rows_by_tool(problem, "top5")["eigenthings"]["status"] == "reached"


def test_spectrum_vs_peers_smoke_cnn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CNN with BatchNorm (the MLP runs in the suite test below), every installed peer."""
    output = tmp_path / "peers.json"
    report = load_peers_script(monkeypatch).main(
        ["--smoke", "--models", "cnn", "--seeds", "1", "--threads", "1", "--json", str(output)]
    )
    printed = capsys.readouterr().out
    assert "| model | task | ours | PyHessian | curvlinops | hessian-eigenthings | speed-up |" in printed
    assert re.search(r"\| cnn \| top-5 to 0\.001 \| [0-9.]+ s \(\d+ HVPs\) \|", printed)
    assert json.loads(output.read_text())["results"][0]["name"] == "cnn"
    check_peers_report(report, "cnn")


def test_ladder_search_moves_up_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """top5 moves up at the first failing seed; trace decides on the RMS over all seeds."""
    peers = load_peers_script(monkeypatch)

    def outcome(error: float, hvps: int = 10) -> object:
        return peers.RunOutcome(seconds=1.0, hvps=hvps, error=error)

    spec = peers.TaskSpec(run=lambda *a: None, ladder=[1, 2, 3], describe=str)
    top = peers.Search("ours", "top5", spec, seeds=[0, 1], target=1e-3)
    top.record(outcome(5e-3), cap=100)
    assert (top.level, top.done) == (1, False)
    top.record(outcome(1e-4), cap=100)
    top.record(outcome(2e-4), cap=100)
    assert top.done and top.reached and top.setting == 2 and top.accuracy() == 2e-4

    trace = peers.Search("ours", "trace", spec, seeds=[0, 1], target=0.02)
    trace.record(outcome(0.025), cap=100)  # 0.025^2 <= 2 * 0.02^2: the RMS can still make it
    assert (trace.level, len(trace.runs)) == (0, 1)
    trace.record(outcome(0.01), cap=100)
    assert trace.reached and math.isclose(trace.accuracy(), math.sqrt((0.025**2 + 0.01**2) / 2))

    capped = peers.Search("ours", "trace", spec, seeds=[0], target=0.02)
    capped.record(outcome(0.5, hvps=100), cap=100)  # at the cap: a dearer setting cannot help
    assert capped.done and not capped.reached and capped.level == 0


def test_gpu_suite_smoke(tmp_path: Path) -> None:
    """Every step of benchmarks/gpu_suite.sh on the CPU with tiny sizes, into one folder."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--smoke"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("spectrum_vs_peers", "callback_overhead", "train_throughput"):
        assert re.search(rf"^{step}: ok, \d+ s$", summary, re.MULTILINE), summary
    if (BENCHMARKS / "hvp_cost.py").exists():
        assert re.search(r"^hvp_cost: ok", summary, re.MULTILINE), summary
    else:
        assert "hvp_cost: SKIPPED" in summary

    environment = (tmp_path / "env.txt").read_text()
    assert "card: " in environment and "torch " in environment

    overhead = (tmp_path / "callback_overhead.log").read_text()
    for analysis in ("top-1", "full"):  # name, epoch s, steps, analysis s, ratio, CPU ratio, HVPs, ...
        match = re.search(rf"^{analysis}\s+([0-9.]+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s", overhead, re.MULTILINE)
        assert match, overhead
        epoch, steps, analysis_seconds, ratio = map(float, match.groups())
        assert steps == 2 and epoch > 0 and analysis_seconds > 0
        assert math.isclose(ratio, analysis_seconds / epoch, rel_tol=0.1)  # columns rounded to 3 decimals

    throughput = (tmp_path / "train_throughput.log").read_text()
    for side in ("hessian-train", "lightning bare", "plain"):
        assert re.search(rf"^{side}\s+[0-9.]+\s+[0-9.]+", throughput, re.MULTILINE), throughput

    check_peers_report(json.loads((tmp_path / "spectrum_vs_peers.json").read_text()), "mlp")


def test_robust_training_step_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """Every method and slice size runs, the whole batch is the reference of its own method, and a
    sliced attack gives the whole batch's perturbation up to rounding. Rounding may flip the sign of
    an almost-zero gradient entry, and that pixel then moves by a step or two: with two threads 186
    of 50,176 pixels (0.4 %) for TRADES, whose first step starts next to the clean input where the
    KL gradient is almost zero. Slices that mixed samples up would change about half of them."""
    output = tmp_path / "steps.json"
    report = load_benchmark("robust_training_step", monkeypatch).main(
        ["--smoke", "--threads", "1", "--json", str(output)]
    )
    printed = capsys.readouterr().out
    assert (
        "| method | attack_batch_size | step s | speed-up | max perturbation difference | pixels differing |" in printed
    )
    assert re.search(r"\| pgd \| 16 \| [0-9.]+ \| [0-9.]+ \| ", printed)
    rows = report["results"]
    assert [(row["method"], row["attack_batch_size"]) for row in rows] == [
        (method, size) for method in ("fgsm", "pgd", "trades") for size in (None, 16)
    ]
    for row in rows:
        assert row["step_s"] > 0 and len(row["step_s_all"]) == 1
        assert row["pixels_differing"] <= 0.05 * 64 * 28 * 28 and row["max_perturbation_difference"] <= 0.1 + 1e-6
        if row["attack_batch_size"] is None:
            assert row["speedup"] == 1.0
    assert json.loads(output.read_text())["batch_size"] == 64
