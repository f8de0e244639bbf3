"""Gradient checkpointing is chosen by itself only when a step would not fit the GPU's memory."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from invokeai_ti_plugin.training.memory_plan import GIB, activation_estimate, plan_memory


@pytest.mark.parametrize(
    ("base", "resolution", "free_gib", "expected"),
    [
        # the measured H200 cases: SD 1.5 at 512 px fits a 8 GB card's leftovers,
        # SDXL at 1024 px does not fit what a 12 GB card leaves beside its 6.7 GiB of weights
        ("sd-1", 512, 6.0, False),
        ("sd-1", 512, 1.0, True),
        ("sdxl", 1024, 12.0 - 6.7, True),
        ("sdxl", 1024, 24.0 - 6.7, False),
    ],
)
def test_checkpointing_follows_the_free_memory(
    base: str, resolution: int, free_gib: float, expected: bool
) -> None:
    plan = plan_memory(False, int(free_gib * GIB), base, resolution, 1, torch.float16)
    assert plan.gradient_checkpointing is expected
    assert ("GiB free" in plan.reason) is expected


def test_estimate_grows_with_batch_area_and_precision() -> None:
    one = activation_estimate("sd-1", 512, 1, torch.float16)
    assert activation_estimate("sd-1", 512, 4, torch.float16) > 3.5 * (one - 0.5 * GIB)
    assert activation_estimate("sd-1", 1024, 1, torch.float16) > 3.5 * (one - 0.5 * GIB)
    assert activation_estimate("sd-1", 512, 1, torch.float32) > one


def test_the_users_choice_and_a_cpu_are_respected() -> None:
    assert plan_memory(True, 100 * GIB, "sd-1", 512, 1, torch.float16).gradient_checkpointing
    assert not plan_memory(False, None, "sdxl", 1024, 8, torch.float32).gradient_checkpointing


def test_a_cpu_run_says_nothing_about_checkpointing_unless_asked(
    make_config, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from invokeai_ti_plugin.training.trainer import Trainer

    with caplog.at_level(logging.INFO, logger="invokeai_ti_plugin"):
        Trainer(make_config(max_train_steps=1, gradient_checkpointing=True)).run()
    assert "gradient checkpointing on: --gradient_checkpointing was given" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="invokeai_ti_plugin"):
        Trainer(
            make_config(max_train_steps=1, output_dir=str(tmp_path / "second"))
        ).run()
    assert "gradient checkpointing" not in caplog.text
