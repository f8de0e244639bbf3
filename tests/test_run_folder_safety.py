"""Output folders: a run never loses a user's files, one run at a time, readable results."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from invokeai_ti_plugin.atomic_files import write_atomically
from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.errors import UserInputError
from invokeai_ti_plugin.host.embedding_sync import sync_embeddings
from invokeai_ti_plugin.host.model_db import open_host_models
from invokeai_ti_plugin.host.node_pack import node_pack_folder
from invokeai_ti_plugin.training.checkpoints import list_checkpoints
from invokeai_ti_plugin.training.embedding_file import (
    EmbeddingVectors,
    read_embedding_vectors,
    save_vectors,
)
from invokeai_ti_plugin.training.run_folder import LOCK_FILENAME, MARKER_FILENAME, RunFolder
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import cli_args, host_records, one_error_line, start_training

MakeConfig = Callable[..., TrainingConfig]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _one_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Status 2 and nothing on stderr but one line about --output_dir."""
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1, stderr
    return one_error_line(stderr, "invokeai-ti: error: --output_dir: ")


def _valid_embedding(path: Path) -> None:
    vectors = read_embedding_vectors(path).tensors["emb_params"]
    assert vectors.shape == (1, 768) and bool(torch.isfinite(vectors).all())


def test_a_foreign_folder_loses_nothing(
    capsys: pytest.CaptureFixture[str], sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "logs").mkdir()
    (out / "checkpoints" / "important.ckpt").write_bytes(b"weights of another project")
    (out / "loss.png").write_bytes(b"my own plot")
    (out / "embedding.json").write_text('{"mine": true}')
    (out / "logs" / "history.jsonl").write_text('{"step": 1}\n')
    before = _files(out)

    error = _one_error(capsys, cli_args(sd1_model, object_images, out))
    assert "is not an invokeai-ti output folder" in error and "--overwrite" in error
    assert _files(out) == before

    error = _one_error(capsys, cli_args(sd1_model, object_images, out, "--overwrite"))
    expected = "holds embedding.json, checkpoints, logs/history.jsonl, loss.png, not written by"
    assert expected in error, error
    assert _files(out) == before  # nothing replaced, nothing added (no marker, no lock)


def test_overwrite_trains_beside_unrelated_files(
    sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    (out / "pictures").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "pictures" / "a.png").write_bytes(b"not ours")
    assert main(cli_args(sd1_model, object_images, out, "--overwrite")) == 0
    files = _files(out)
    assert files["notes.txt"] == b"keep me" and files["pictures/a.png"] == b"not ours"
    _valid_embedding(out / "learned_embeds.safetensors")
    assert MARKER_FILENAME in files and LOCK_FILENAME in files


def test_overwrite_in_our_folder_clears_only_our_checkpoints(make_config: MakeConfig) -> None:
    first = make_config(max_train_steps=4, checkpointing_steps=2)
    Trainer(first).run()
    out = first.out_dir
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    (out / "checkpoints" / "important.ckpt").write_bytes(b"dropped in by the user")
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(UserInputError, match="already holds an embedding or checkpoints"):
        Trainer(make_config(max_train_steps=3, seed=7)).run()

    Trainer(make_config(max_train_steps=3, checkpointing_steps=5, seed=7, overwrite=True)).run()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-3",
        "important.ckpt",
    ]
    assert (out / "checkpoints" / "important.ckpt").read_bytes() == b"dropped in by the user"
    assert (out / "notes.txt").read_text() == "keep me"
    assert len((out / "logs" / "history.jsonl").read_text().splitlines()) == 3


def test_an_output_folder_inside_the_embeddings_folder_is_refused(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    embeddings = host_root / "embeddings"
    embeddings.mkdir(exist_ok=True)
    before = sorted(embeddings.rglob("*"))
    link = tmp_path / "link"
    link.symlink_to(embeddings)
    for out in (embeddings / "run", embeddings, link / "run"):
        args = cli_args("tiny-sd-1", object_images, out, f"--root={host_root}")
        error = _one_error(capsys, args)
        assert f"is inside {embeddings.resolve()}" in error, error
        assert sorted(embeddings.rglob("*")) == before
    assert host_records(host_root) == []


def test_the_startup_scan_skips_run_folders(host_root: Path) -> None:
    embeddings = host_root / "embeddings"
    with RunFolder(embeddings / "old-run") as run:  # e.g. made there before it was refused
        run.claim(overwrite=False)
        save_vectors(run.embedding, EmbeddingVectors({"emb_params": torch.randn(1, 768)}), {})
        save_vectors(
            run.checkpoint(2) / "learned_embeds.safetensors",
            EmbeddingVectors({"emb_params": torch.randn(1, 768)}),
            {},
        )
    dropped = embeddings / "dropped" / "learned_embeds.safetensors"
    save_vectors(dropped, EmbeddingVectors({"emb_params": torch.randn(1, 768)}), {})
    with open_host_models(host_root) as models:
        report = sync_embeddings(models)
    assert report.registered == ["dropped"] and report.refused == []
    assert [record.name for record in host_records(host_root)] == ["dropped"]


def test_a_busy_folder_refuses_a_second_run_in_this_process(make_config: MakeConfig) -> None:
    config = make_config()
    with RunFolder(config.out_dir) as holder:
        holder.claim(overwrite=False)
        for second in (config, make_config(overwrite=True)):
            with pytest.raises(UserInputError, match=f"another run is training in .*{os.getpid()}"):
                Trainer(second).run()
        assert sorted(p.name for p in config.out_dir.iterdir()) == sorted(
            [LOCK_FILENAME, MARKER_FILENAME]
        )
    Trainer(config).run()  # released: the folder is free again
    _valid_embedding(config.out_dir / "learned_embeds.safetensors")


def test_the_lock_is_released_when_a_run_fails(make_config: MakeConfig) -> None:
    def fail(update: object) -> None:
        raise RuntimeError("a bug in a progress display")

    config = make_config()
    with pytest.raises(RuntimeError, match="progress display"):
        Trainer(config, on_progress=fail).run()
    Trainer(make_config(overwrite=True)).run()
    _valid_embedding(config.out_dir / "learned_embeds.safetensors")


def _start_long_run(model: Path, data: Path, out: Path) -> subprocess.Popen[str]:
    """A training subprocess that is past its start (it holds the lock) when this returns."""
    args = cli_args(model, data, out, "--max_train_steps=100000", "--checkpointing_steps=100000")
    return start_training(args, out)


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_stops_with_one_line(
    capsys: pytest.CaptureFixture[str], sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = _start_long_run(sd1_model, object_images, out)
    try:
        for extra in ([], ["--overwrite"], ["--resume_from_checkpoint=latest"]):
            error = _one_error(capsys, cli_args(sd1_model, object_images, out, *extra))
            assert f"another run is training in {out} (process {first.pid})" in error
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert "Traceback" not in stderr and "Stopped at step" in stdout
    steps = len((out / "logs" / "history.jsonl").read_text().splitlines())
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{steps}"]
    _valid_embedding(out / "learned_embeds.safetensors")


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_does_not_block(
    sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed = _start_long_run(sd1_model, object_images, out)
    killed.kill()  # SIGKILL: no clean-up of any kind
    killed.communicate(timeout=60)
    assert (out / LOCK_FILENAME).read_text().strip() == str(killed.pid)
    assert main(cli_args(sd1_model, object_images, out, "--overwrite")) == 0
    _valid_embedding(out / "learned_embeds.safetensors")
    assert (out / LOCK_FILENAME).read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_files_we_write_are_readable_by_others(
    host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = cli_args(
        "tiny-sd-1", object_images, out, f"--root={host_root}", "--checkpointing_steps=1"
    )
    previous = os.umask(0o022)
    try:
        assert main([*args, "--num_validation_images=1"]) == 0
    finally:
        os.umask(previous)
    ours = [out, host_root / "embeddings", node_pack_folder(host_root)]
    files = [path for folder in ours for path in folder.rglob("*") if path.is_file()]
    assert {
        "learned_embeds.safetensors",
        "embedding.json",
        "trainer_state.json",
        "loss.png",
        "__init__.py",
        "history.jsonl",
        "train.log",
        MARKER_FILENAME,
    } <= {p.name for p in files}
    assert {path: oct(path.stat().st_mode & 0o777) for path in files} == {
        path: oct(0o644) for path in files
    }


def test_atomic_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        write_atomically(tmp_path / "a.txt", lambda temp: temp.write_text("x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
