"""The GPU check (benchmarks/gpu_check.sh) on the tiny models and the CPU, so that the script a
GPU machine runs once in a while cannot rot unnoticed between those runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import CAN_COMPILE

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
MODELS = ("tiny-sd15", "tiny-sdxl")
# (batch, variant, gradient checkpointing, torch_compile, on the smallest card): every
# configuration the GPU run measures
CONFIGURATIONS = {
    (1, "ours", False, "off", False),
    (1, "classic", False, "off", False),
    (1, "ours", False, "off", True),
    (1, "ours", False, "default", False),
    (1, "ours", True, "off", False),
    (1, "ours", False, "reduce-overhead", False),
    (4, "ours", False, "off", False),
    (4, "classic", False, "off", False),
    (4, "ours", True, "off", False),
    (1, "classic", True, "off", False),
    (4, "ours", False, "reduce-overhead", False),
}
COMPILE_MODE = "default" if CAN_COMPILE else ""  # the compiled configuration, where it can run
MEASURED = ("seconds_per_step", "steps_per_s", "peak_mib", "steady_peak_mib", "first_step_s")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _run_check(tmp_path: Path, *options: str, timeout: int) -> tuple[str, dict[str, Any]]:
    """gpu_check.sh on the tiny models and the CPU: its stdout (the table) and its JSON report."""
    report_path = tmp_path / "report.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    options += ("--json", str(report_path), "--workdir", str(tmp_path / "work"))
    completed = subprocess.run(
        ["bash", str(SCRIPT), "--tiny", "--device", "cpu", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, json.loads(report_path.read_text())


@pytest.mark.slow
def test_tiny_cpu_run_measures_every_configuration(tmp_path: Path) -> None:
    # batch 1 and one compile mode: the rest runs the same code, and the test stays minutes
    # shorter (on a CPU, 'reduce-overhead' compiles what 'default' does)
    stdout, report = _run_check(tmp_path, "--batch", "1", "--compile", COMPILE_MODE, timeout=1800)
    assert report["device"] == "cpu" and report["tiny"] is True
    rows = {
        (
            row["model"],
            row["batch"],
            row["variant"],
            row["gradient_checkpointing"],
            row["torch_compile"],
            row["card_gib"] is not None,
        ): row
        for row in report["rows"]
    }
    expected = {(model, *config) for model in MODELS for config in CONFIGURATIONS}
    assert set(rows) == {key for key in expected if key[1] == 1 and key[4] in ("off", COMPILE_MODE)}
    for key, row in rows.items():
        assert row["resolution"] == 64
        if key[5]:  # a smaller card is played by holding CUDA memory
            assert row["status"] == "skipped"
            assert row["reason"] == "playing a smaller card needs CUDA"
            continue
        assert row["status"] == "ok", (key, row["reason"])
        numbers = row["result"]
        assert all(_positive(numbers[name]) for name in MEASURED), (key, numbers)
        assert numbers["measured_steps"] == 2
        assert len(numbers["step_seconds"]) == 2
        assert numbers["gradient_checkpointing"] == key[3]
        assert numbers["torch_compile"] == key[4]
        assert numbers["gpu_kernel_s_per_step"] is None  # profiled on CUDA only

    # each of our settings against the classic loop, per model and batch
    compared = {(c["model"], c["batch"], c["ours"]) for c in report["comparisons"]}
    assert compared == {
        (model, 1, ours)
        for model in MODELS
        for ours in ("ours", "ours +checkpointing", "ours +compile(default)")
        if COMPILE_MODE or "compile" not in ours
    }
    for comparison in report["comparisons"]:
        ratios = ("speed_ratio", "memory_ratio", "steady_memory_ratio")
        assert all(_positive(comparison[name]) for name in ratios), comparison
        assert "verdicts" not in comparison  # the tiny models have no targets
        payoff = comparison.get("compile")
        assert (payoff is not None) == comparison["ours"].endswith("+compile(default)")
        if payoff:  # tracing and compiling the UNet takes seconds even from torch's cache
            assert _positive(payoff["compile_s"]), payoff
            assert _positive(payoff["run_s"]["compiled"]) and payoff["run_s"]["updates"] == 3000

    for model in MODELS:
        assert f"== {model}: 64 px, batch 1" in stdout
    assert "ours +checkpointing/classic: steps/s" in stdout
    assert ("compiling cost" in stdout) == bool(COMPILE_MODE)


@pytest.mark.slow
def test_a_split_lease_measures_what_it_is_asked_in_that_order(tmp_path: Path) -> None:
    """The second call of a short lease: SDXL first, only ours and its compiled run, and the
    compile payoff reported without a classic row to set ours against."""
    options = ["--models", "sdxl,sd15", "--batch", "1", "--compile", COMPILE_MODE]
    stdout, report = _run_check(tmp_path, *options, "--only", "ours,compile", timeout=1200)
    order = [(row["model"], row["torch_compile"], row["status"]) for row in report["rows"]]
    expected = [("tiny-sdxl", "off", "ok"), ("tiny-sd15", "off", "ok")]
    if COMPILE_MODE:
        expected += [("tiny-sdxl", "default", "ok"), ("tiny-sd15", "default", "ok")]
    assert order == expected
    assert all("speed_ratio" not in entry for entry in report["comparisons"])
    assert len(report["comparisons"]) == (2 if COMPILE_MODE else 0)
    for entry in report["comparisons"]:
        assert _positive(entry["compile"]["run_s"]["compiled"]), entry
    assert stdout.count("compiling cost") == len(report["comparisons"])
    assert stdout.index("== tiny-sdxl") < stdout.index("== tiny-sd15")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--models", "sd3"], "--models: unknown sd3; use sd15, sdxl"),
        # a lease spent measuring nothing it was asked for: compile rows are planned at batch 1
        (["--batch", "4", "--only", "ours,card"], "--only card: the plan has none at batch 4"),
        (
            ["--compile", "", "--only", "compile"],
            "--only compile: the plan has none at batch 1,4 (compile rows need --compile)",
        ),
    ],
)
def test_a_check_that_would_measure_nothing_asked_is_refused(
    tmp_path: Path, options: list[str], error: str
) -> None:
    report = tmp_path / "r.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            *("--tiny", "--device", "cpu", "--json", str(report)),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].endswith(error)
    assert not report.exists()
