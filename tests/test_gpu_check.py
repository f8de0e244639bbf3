"""The GPU check (benchmarks/gpu_check.sh) on the tiny models and the CPU, so that the script a
GPU machine runs once in a while cannot rot unnoticed between those runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
MODELS = ("tiny-sd15", "tiny-sdxl")
# (batch, variant, gradient checkpointing): every configuration the GPU run measures
CONFIGURATIONS = {
    (1, "ours", False),
    (1, "classic", False),
    (1, "ours", True),
    (4, "ours", False),
    (4, "classic", False),
    (4, "ours", True),
    (1, "classic", True),
}
MEASURED = ("seconds_per_step", "steps_per_s", "peak_mib", "steady_peak_mib", "first_step_s")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_cpu_run_measures_every_configuration(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    # batch 1 only: batch 4 runs the same code, and the test stays a minute shorter
    options = ["--tiny", "--device", "cpu", "--batch", "1", "--json", str(report_path)]
    completed = subprocess.run(
        ["bash", str(SCRIPT), *options, "--workdir", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["tiny"] is True
    rows = {
        (row["model"], row["batch"], row["variant"], row["gradient_checkpointing"]): row
        for row in report["rows"]
    }
    expected = {(model, *config) for model in MODELS for config in CONFIGURATIONS}
    assert set(rows) == {key for key in expected if key[1] == 1}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row["reason"])
        assert row["resolution"] == 64
        numbers = row["result"]
        assert all(_positive(numbers[name]) for name in MEASURED), (key, numbers)
        assert numbers["measured_steps"] == 2
        assert len(numbers["step_seconds"]) == 2
        assert numbers["gradient_checkpointing"] == key[3]

    # ours and ours with checkpointing against the classic loop, per model and batch
    compared = {(c["model"], c["batch"], c["ours"]) for c in report["comparisons"]}
    assert compared == {
        (model, batch, ours)
        for model in MODELS
        for batch in (1,)
        for ours in ("ours", "ours +checkpointing")
    }
    for comparison in report["comparisons"]:
        ratios = ("speed_ratio", "memory_ratio", "steady_memory_ratio")
        assert all(_positive(comparison[name]) for name in ratios), comparison
        assert "verdicts" not in comparison  # the tiny models have no targets

    for model in MODELS:
        assert f"== {model}: 64 px, batch 1" in completed.stdout
    assert "ours +checkpointing/classic: steps/s" in completed.stdout


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    options = ["--tiny", "--device", "cpu", "--models", "sd3", "--json", str(tmp_path / "r.json")]
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    assert "--models: unknown sd3; use sd15, sdxl" in completed.stderr
    assert not (tmp_path / "r.json").exists()
