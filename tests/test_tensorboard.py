"""--report_to tensorboard: the run's curves in TensorBoard's own event files, read back with
TensorBoard's own reader; a resumed run carries them on, a fresh one starts them afresh."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from invokeai_ti_plugin.errors import UserInputError
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import COMMAND, cli_args


def _curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


@pytest.mark.slow
def test_tensorboard_gets_the_runs_curves(make_config) -> None:
    options = {"report_to": "tensorboard", "validation_steps": 2}
    config = make_config(max_train_steps=4, **options)
    Trainer(config).run()
    tensorboard = config.out_dir / "logs" / "tensorboard"
    curves = _curves(tensorboard)
    assert set(curves) == {"loss", "lr", "eval_loss"}
    history = [json.loads(line) for line in (config.out_dir / "logs" / "history.jsonl").open()]
    assert [step for step, _ in curves["loss"]] == [1, 2, 3, 4]
    for (step, value), record in zip(curves["loss"], history, strict=True):
        assert step == record["step"] and value == pytest.approx(record["loss"], rel=1e-6)
    assert [step for step, _ in curves["eval_loss"]] == [0, 2, 4]
    assert [value for _, value in curves["lr"]] == pytest.approx([config.learning_rate] * 4)

    Trainer(make_config(max_train_steps=6, resume_from_checkpoint="latest", **options)).run()
    assert [step for step, _ in _curves(tensorboard)["loss"]] == [1, 2, 3, 4, 5, 6]

    Trainer(make_config(max_train_steps=2, overwrite=True, **options)).run()
    assert [step for step, _ in _curves(tensorboard)["loss"]] == [1, 2]


def test_a_folder_of_someone_elses_tensorboard_logs_is_refused(make_config) -> None:
    config = make_config(report_to="tensorboard")
    foreign = config.out_dir / "logs" / "tensorboard"
    foreign.mkdir(parents=True)
    (foreign / "events.out.tfevents.1.other").write_bytes(b"someone else's run")
    (config.out_dir / ".invokeai-ti-run.json").write_text(
        json.dumps({"kind": "invokeai-ti run folder", "paths": []})
    )
    with pytest.raises(UserInputError, match="logs/tensorboard, not written by invokeai-ti"):
        Trainer(config).run()
    assert (foreign / "events.out.tfevents.1.other").read_bytes() == b"someone else's run"


@pytest.mark.slow
def test_a_tensorboard_that_does_not_load_is_one_warning_and_the_run_goes_on(
    sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    """tensorboard 2.21 beside InvokeAI's protobuf 4 (uv installs the pair): importing it fails
    with protobuf's own ImportError, which accelerate met only at the first step."""
    broken = tmp_path / "site" / "tensorboard"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("from google.protobuf import runtime_version\n")
    out = tmp_path / "out"
    args = cli_args(sd1_model, object_images, out, "--report_to=tensorboard")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [COMMAND, *args, "--no-register_embedding"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    assert "Traceback" not in shown
    (warning,) = [line for line in shown.splitlines() if "tensorboard is" in line]
    assert warning.startswith(
        "tensorboard is installed but does not load (ImportError: cannot import name "
    ), warning
    assert 'pip install "tensorboard<2.21"' in warning
    assert (out / "learned_embeds.safetensors").is_file()
    assert len((out / "logs" / "history.jsonl").read_text().splitlines()) == 2
    assert not (out / "logs" / "tensorboard").exists()
