"""The GPU check (benchmarks/gpu_check.sh) on the tiny models and the CPU, so that the script a
GPU machine runs once in a while cannot rot unnoticed between those runs."""

from __future__ import annotations

import importlib
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
def test_tiny_cpu_run_measures_every_kind_of_configuration(tmp_path: Path) -> None:
    # one model, batch 1 and one compile mode: the rest runs the same code, and each worker costs
    # a process start (on a CPU, 'reduce-overhead' compiles what 'default' does)
    options = ["--models", "sd15", "--batch", "1", "--compile", COMPILE_MODE]
    stdout, report = _run_check(tmp_path, *options, timeout=1800)
    assert report["device"] == "cpu" and report["tiny"] is True
    rows = {
        (
            row["batch"],
            row["variant"],
            row["gradient_checkpointing"],
            row["torch_compile"],
            row["card_gib"] is not None,
        ): row
        for row in report["rows"]
    }
    assert {row["model"] for row in report["rows"]} == {"tiny-sd15"}
    asked = {key for key in CONFIGURATIONS if key[0] == 1 and key[3] in ("off", COMPILE_MODE)}
    assert set(rows) == asked
    for key, row in rows.items():
        assert row["resolution"] == 64
        if key[4]:  # a smaller card is played by holding CUDA memory
            assert row["status"] == "skipped"
            assert row["reason"] == "playing a smaller card needs CUDA"
            continue
        assert row["status"] == "ok", (key, row["reason"])
        numbers = row["result"]
        assert all(_positive(numbers[name]) for name in MEASURED), (key, numbers)
        assert numbers["measured_steps"] == 2
        assert len(numbers["step_seconds"]) == 2
        assert numbers["gradient_checkpointing"] == key[2]
        assert numbers["torch_compile"] == key[3]
        assert numbers["gpu_kernel_s_per_step"] is None  # profiled on CUDA only

    # each of our settings against the classic loop
    compared = {(c["model"], c["batch"], c["ours"]) for c in report["comparisons"]}
    assert compared == {
        ("tiny-sd15", 1, ours)
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

    assert "== tiny-sd15: 64 px, batch 1" in stdout and "tiny-sdxl" not in stdout
    assert "ours +checkpointing/classic: steps/s" in stdout
    assert ("compiling cost" in stdout) == bool(COMPILE_MODE)


@pytest.mark.slow
def test_a_split_lease_measures_what_it_is_asked_in_that_order(tmp_path: Path) -> None:
    """The first call of a short lease: only ours and the classic loop, setting by setting in
    the plan's order of importance, and within each the models in the order asked."""
    options = ["--models", "sdxl,sd15", "--batch", "1", "--only", "ours,classic"]
    stdout, report = _run_check(tmp_path, *options, timeout=1200)
    order = [(row["model"], row["variant"], row["status"]) for row in report["rows"]]
    assert order == [
        ("tiny-sdxl", "ours", "ok"),
        ("tiny-sd15", "ours", "ok"),
        ("tiny-sdxl", "classic", "ok"),
        ("tiny-sd15", "classic", "ok"),
    ]
    assert [(c["model"], c["ours"]) for c in report["comparisons"]] == [
        ("tiny-sdxl", "ours"),
        ("tiny-sd15", "ours"),
    ]
    assert all(_positive(c["speed_ratio"]) for c in report["comparisons"])
    assert stdout.index("== tiny-sdxl") < stdout.index("== tiny-sd15")
    assert stdout.count("ours/classic: steps/s") == 2


@pytest.mark.parametrize(
    ("compiled_step_s", "verdict"),
    [
        (0.20, "pays after 612 updates (PASS within 3000)"),
        (0.35, "pays after never (MISS within 3000)"),  # compiled, yet slower per update
    ],
)
def test_a_compiled_run_without_a_classic_row_is_weighed_against_ours_alone(
    monkeypatch: pytest.MonkeyPatch, compiled_step_s: float, verdict: str
) -> None:
    """The second call of a short lease measures ours and its compiled run only (`--only
    ours,compile`): what compiling costs and saves is still reported, with no classic ratio."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    model = gpu_check.TINY[0]

    def row(torch_compile: str, step_s: float, time_to_steady_s: float) -> Any:
        numbers = {
            "seconds_per_step": step_s,
            "steps_per_s": 1 / step_s,
            "peak_mib": 1000.0,
            "steady_peak_mib": 900.0,
            "gradient_checkpointing": False,
            "time_to_steady_s": time_to_steady_s,
            "warmup": 12,
        }
        return gpu_check.Row(
            model.name, 64, 1, "ours", False, torch_compile, None, "ok", "", numbers
        )

    # one-off time (to steady, less the warm-up's updates): 10 - 12 * 0.3 = 6.4 s uncompiled,
    # and 61.2 s more compiled; saving 0.1 s/update, that pays after 612 updates
    eager = row("off", 0.30, 10.0)
    compiled = row("default", compiled_step_s, 61.2 + 6.4 + 12 * compiled_step_s)
    (entry,) = gpu_check.compare([eager, compiled], (model,))
    assert entry["ours"] == "ours +compile(default)" and "speed_ratio" not in entry
    assert entry["compile"]["compile_s"] == pytest.approx(61.2)
    line = gpu_check._comparison_line(entry, model)
    assert line.startswith("  ours +compile(default)\n    compiling cost 61 s and saves ")
    assert verdict in line
    assert gpu_check.compare([eager], (model,)) == []  # nothing to set ours against


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
