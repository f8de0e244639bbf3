"""Resume survives real life: changed images, damaged checkpoints, a diverging run, kill -9."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.errors import UserInputError
from invokeai_ti_plugin.training.checkpoints import list_checkpoints, load_checkpoint, resume_point
from invokeai_ti_plugin.training.reports import ProgressUpdate
from invokeai_ti_plugin.training.run_folder import MARKER_FILENAME
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import COMMAND, cli_args, embedding_vectors, host_records, one_error_line

MakeConfig = Callable[..., TrainingConfig]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "train.log"  # a refused run may log why
    }


def _losses(out: Path) -> list[float]:
    lines = (out / "logs" / "history.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _stop_at(trainer: Trainer, step: int) -> Trainer:
    def stop(update: ProgressUpdate) -> None:
        if update.step == step:
            trainer.request_stop()

    trainer.on_progress = stop
    return trainer


@pytest.mark.slow
def test_a_changed_image_folder_is_named_and_nothing_is_touched(
    make_config: MakeConfig, object_images: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(object_images, data)
    config = make_config(train_data_dir=data, max_train_steps=2, checkpointing_steps=1)
    Trainer(config).run()
    state = json.loads((list_checkpoints(config.out_dir)[-1] / "trainer_state.json").read_text())
    names = sorted(path.name for path in data.iterdir())
    assert sorted(state["images"]) == names  # names and a fingerprint of each
    before = _files(config.out_dir)
    resumed = config.model_copy(update={"resume_from_checkpoint": "latest", "max_train_steps": 4})
    original = (data / names[1]).read_bytes()

    def refused(expected: str) -> None:
        with pytest.raises(UserInputError) as caught:
            Trainer(resumed).run()
        message = str(caught.value)
        assert expected in message and "\n" not in message, message
        assert "put them back" in message and "--overwrite" in message
        assert _files(config.out_dir) == before

    Image.new("RGB", (40, 30), (9, 9, 9)).save(data / "extra.png")
    refused("(added: extra.png)")
    (data / "extra.png").unlink()
    (data / names[0]).rename(tmp_path / names[0])
    refused(f"(removed: {names[0]})")
    (tmp_path / names[0]).rename(data / names[0])
    Image.new("RGB", (40, 30), (200, 9, 9)).save(data / names[1])
    refused(f"(changed: {names[1]})")
    (data / names[1]).write_bytes(original)
    (data / names[1]).with_suffix(".txt").write_text("a photo of <striped-ball> on grass")
    refused(f"(changed: {names[1]})")  # its caption is part of what it teaches
    (data / names[1]).with_suffix(".txt").unlink()

    result = Trainer(resumed).run()  # put back as it was: resumes
    assert result.completed and result.steps == 4


def test_changed_images_are_one_line_from_the_command_line(
    sd1_model: Path, object_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(object_images, data)
    assert main(cli_args(sd1_model, data, out, "--max_train_steps=1")) == 0
    for path in sorted(data.iterdir())[:2]:
        path.unlink()
    capsys.readouterr()
    args = cli_args(sd1_model, data, out, "--max_train_steps=2", "--resume_from_checkpoint=latest")
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "removed: ")
    assert "checkpoint-1" in line and "--overwrite" in line


@pytest.mark.slow
def test_output_folder_inside_the_data_folder_resumes_without_its_own_files(
    make_config: MakeConfig, object_images: Path, tmp_path: Path
) -> None:
    whole = make_config(max_train_steps=4, checkpointing_steps=1, output_dir=tmp_path / "whole")
    expected = embedding_vectors(Trainer(whole).run().embedding_path)

    shared = tmp_path / "shared"  # --output_dir == --train_data_dir
    shutil.copytree(object_images, shared)
    first = make_config(
        train_data_dir=shared, output_dir=shared, overwrite=True, max_train_steps=2
    ).model_copy(update={"checkpointing_steps": 1})
    Trainer(first).run()
    assert (shared / "loss.png").is_file()  # now beside the pictures
    resumed = first.model_copy(
        update={"resume_from_checkpoint": "latest", "max_train_steps": 4, "overwrite": False}
    )
    result = Trainer(resumed).run()
    got = embedding_vectors(result.embedding_path)
    assert torch.equal(got, expected)  # loss.png was never a training image
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert "loss.png" not in state["images"] and len(state["images"]) == 4


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_fact(name: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        facts = json.loads(path.read_text())
        del facts[name]
        path.write_text(json.dumps(facts))

    return damage


class _RunsCode:
    """A pickle that would create a file if it were ever unpickled with code allowed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


# (file in the newest checkpoint, what is done to it, words the reason names)
DAMAGES: list[tuple[str, Callable[[Path], None], str]] = [
    ("optimizer.pt", _truncate, "optimizer.pt is not a whole torch.save archive"),
    ("optimizer.pt", lambda path: path.write_bytes(b"\0garbage" * 99), "Python objects"),
    ("optimizer.pt", lambda path: torch.save([1, 2], path), "optimizer.pt holds a list"),
    ("lr_scheduler.pt", lambda path: torch.save({"x": 1}, path), "lr_scheduler.pt lacks base_lrs"),
    ("trainer_state.json", _drop_fact("seed"), "trainer_state.json has no valid seed"),
    ("trainer_state.json", _drop_fact("images"), "trainer_state.json has no valid images"),
    ("trainer_state.json", lambda path: path.write_text('{"step": 3,'), "trainer_state.json"),
    ("trainer_state.json", lambda path: path.write_text("[]"), "holds no facts"),
    ("learned_embeds.safetensors", lambda path: path.unlink(), "is missing"),
    ("learned_embeds.safetensors", _truncate, "learned_embeds.safetensors"),
    ("random_state_0.pt", lambda path: path.unlink(), "random_state_0.pt is missing"),
    ("random_state_0.pt", _truncate, "random_state_0.pt is not a whole torch.save"),
    ("random_state_0.pt", lambda path: torch.save({"order": 1}, path), "no data-order state"),
]


def test_latest_skips_damaged_checkpoints_and_a_named_one_is_refused_in_one_line(
    make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(max_train_steps=3, checkpointing_steps=1)
    Trainer(config).run()
    made = config.out_dir
    for index, (name, damage, reason) in enumerate(DAMAGES):
        out = tmp_path / f"case-{index}"
        shutil.copytree(made, out)
        newest = list_checkpoints(out)[-1]
        damage(newest / name)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            point = resume_point(out, "latest")
        assert point is not None and point.folder.name == "checkpoint-2", (name, reason)
        warning = caplog.text
        assert "checkpoint-3" in warning and reason in warning, (name, reason, warning)
        with pytest.raises(UserInputError) as caught:
            resume_point(out, str(newest))
        message = str(caught.value)
        assert reason in message and "\n" not in message, (name, message)

    out = tmp_path / "all-damaged"
    shutil.copytree(made, out)
    for folder in list_checkpoints(out):
        _truncate(folder / "optimizer.pt")
    with pytest.raises(UserInputError, match=r"no checkpoint in .* is intact"):
        resume_point(out, "latest")


def test_a_hostile_checkpoint_is_refused_in_one_line_and_runs_nothing(
    sd1_model: Path, object_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(cli_args(sd1_model, object_images, out, "--max_train_steps=1")) == 0
    hostile = tmp_path / "hostile-checkpoint"
    shutil.copytree(list_checkpoints(out)[-1], hostile)
    marker = tmp_path / "code-ran"
    (hostile / "optimizer.pt").write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    capsys.readouterr()
    args = cli_args(sd1_model, object_images, out, f"--resume_from_checkpoint={hostile}")
    assert main([*args, "--max_train_steps=2"]) == 2
    line = one_error_line(capsys.readouterr().err, f"cannot resume from {hostile}")
    assert "optimizer.pt is unreadable" in line
    assert not marker.exists()
    # the same file in the newest checkpoint: `latest` skips it, and still runs nothing
    (list_checkpoints(out)[-1] / "optimizer.pt").write_bytes(
        pickle.dumps(_RunsCode(marker), protocol=2)
    )
    latest = [*cli_args(sd1_model, object_images, out), "--resume_from_checkpoint=latest"]
    assert main([*latest, "--max_train_steps=2"]) == 2
    one_error_line(capsys.readouterr().err, "error: --resume_from_checkpoint: no checkpoint in")
    assert not marker.exists()


@pytest.mark.slow
def test_resume_after_a_damaged_checkpoint_and_a_torn_log_ends_as_if_never_stopped(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    whole = make_config(max_train_steps=4, checkpointing_steps=1, output_dir=tmp_path / "whole")
    expected = embedding_vectors(Trainer(whole).run().embedding_path)
    parted = whole.model_copy(update={"output_dir": tmp_path / "parted"})
    _stop_at(Trainer(parted), 3).run()
    newest = list_checkpoints(parted.out_dir)[-1]
    assert newest.name == "checkpoint-3"
    _truncate(newest / "optimizer.pt")
    with (parted.out_dir / "logs" / "history.jsonl").open("a") as history:
        history.write('{"step": 4, "loss": 0.12')  # a crash in the middle of a line

    result = Trainer(parted.model_copy(update={"resume_from_checkpoint": "latest"})).run()
    got = embedding_vectors(result.embedding_path)
    assert torch.equal(got, expected)
    assert _losses(parted.out_dir) == _losses(whole.out_dir)
    assert load_checkpoint(list_checkpoints(parted.out_dir)[-1]).snapshot.step == 4


def test_a_diverging_run_stops_with_one_line_and_writes_nothing_broken(
    host_root: Path, object_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = cli_args(Path("tiny-sd-1"), object_images, out, f"--root={host_root}")
    code = main([*args, "--max_train_steps=4", "--checkpointing_steps=1", "--learning_rate=1e30"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err, "diverged at step 2: the loss became nan")
    assert "lower --learning_rate (this run used 1e+30)" in line
    assert str(out / "checkpoints" / "checkpoint-1") in line
    assert not (out / "learned_embeds.safetensors").exists()
    assert not (out / "embedding.json").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    load_checkpoint(out / "checkpoints" / "checkpoint-1")  # intact: a run can continue from it
    assert host_records(host_root) == []
    assert not (host_root / "embeddings" / "striped-ball").exists()


def test_vectors_that_overflow_in_the_last_update_are_never_saved(
    make_config: MakeConfig,
) -> None:
    """The last update's loss was measured before it, so only the vectors show that it threw
    them out of float32's range (here the optimizer's real update is followed by one to
    infinity): the run stops before that embedding or a checkpoint of it is written."""

    def overflow(optimizer: torch.optim.Optimizer, *_: object) -> None:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for vectors in group["params"]:
                    vectors.fill_(math.inf)

    config = make_config(max_train_steps=2, checkpointing_steps=1)
    handle = register_optimizer_step_post_hook(overflow)
    try:
        with pytest.raises(UserInputError, match="diverged at step 1: the vectors overflowed"):
            Trainer(config).run()
    finally:
        handle.remove()
    assert not (config.out_dir / "learned_embeds.safetensors").exists()
    assert list_checkpoints(config.out_dir) == []


@pytest.mark.slow
def test_after_a_divergence_a_lower_rate_resumes_from_the_last_checkpoint(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    whole = make_config(max_train_steps=6, checkpointing_steps=2, output_dir=tmp_path / "whole")
    expected = embedding_vectors(Trainer(whole).run().embedding_path)
    parted = whole.model_copy(update={"output_dir": tmp_path / "parted"})
    _stop_at(Trainer(parted), 2).run()
    too_fast = parted.model_copy(update={"resume_from_checkpoint": "latest", "learning_rate": 1e30})
    with pytest.raises(UserInputError, match="diverged at step 4: the loss became nan"):
        Trainer(too_fast).run()  # the new rate is used from the checkpoint on
    assert [p.name for p in list_checkpoints(parted.out_dir)] == ["checkpoint-2"]

    result = Trainer(too_fast.model_copy(update={"learning_rate": whole.learning_rate})).run()
    got = embedding_vectors(result.embedding_path)
    assert torch.equal(got, expected)  # the divergence left no trace
    assert _losses(parted.out_dir) == _losses(whole.out_dir)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes]) -> bool:
    """True once `condition` holds; False if the process ended first."""
    deadline = time.monotonic() + 300
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)
    return True


def _logged(history: Path, step: int) -> bool:
    return history.is_file() and len(history.read_bytes().splitlines()) >= step


def _checkpoint_begun(checkpoints: Path, step: int) -> bool:
    return any(checkpoints.glob(f"*checkpoint-{step}*"))  # being written, or done


def _wait_for_a_random_moment(
    process: subprocess.Popen[bytes], out: Path, steps: int, rng: random.Random
) -> str:
    """Wait for one of a run's moments, chosen at random, and a random while after it: start-up
    (once the folder is claimed), step k logged (training goes on), checkpoint k begun."""
    moments: dict[str, tuple[Callable[[], bool], float]] = {
        "start-up": (lambda: (out / MARKER_FILENAME).is_file(), 1.0)
    }
    for step in range(1, steps):
        moments[f"step {step}"] = (partial(_logged, out / "logs" / "history.jsonl", step), 0.3)
        moments[f"checkpoint {step}"] = (
            partial(_checkpoint_begun, out / "checkpoints", step),
            0.05,
        )
    moment = rng.choice(sorted(moments))
    reached, longest = moments[moment]
    if _wait_for(reached, process):
        time.sleep(rng.uniform(0, longest))
    return moment


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_ends_as_an_uninterrupted_run(
    sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    steps, trials = 5, 10
    options = [
        "--resolution=64",
        "--checkpointing_steps=1",
        f"--max_train_steps={steps}",
        "--seed=5",
    ]
    reference = tmp_path / "reference"
    assert main(cli_args(sd1_model, object_images, reference, *options)) == 0
    expected = embedding_vectors(reference / "learned_embeds.safetensors")
    rng = random.Random(20240611)
    for trial in range(trials):
        out = tmp_path / f"trial-{trial}"
        args = cli_args(sd1_model, object_images, out, *options)
        process = subprocess.Popen(
            [COMMAND, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        moment = _wait_for_a_random_moment(process, out, steps, rng)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

        resumed = [*args, "--resume_from_checkpoint=latest"]
        assert main(resumed) == 0, f"trial {trial}: resume failed"
        got = embedding_vectors(out / "learned_embeds.safetensors")
        assert torch.equal(got, expected), f"trial {trial} (killed at {moment})"
        assert _losses(out) == _losses(reference), f"trial {trial}"
