"""InvokeAI integration against the real host package and its real SQLite model database."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.host import registered_files
from invokeai_ti_plugin.host.embedding_sync import sync_embeddings
from invokeai_ti_plugin.host.embeddings import relate_models
from invokeai_ti_plugin.host.installed_models import find_installed_model
from invokeai_ti_plugin.host.model_db import open_host_models
from invokeai_ti_plugin.host.node_pack import node_pack_folder
from invokeai_ti_plugin.host.registered_files import LIST_FILENAME, RegisteredFiles

from .conftest import COMMAND, DIMENSION_MISMATCH, host_cli_args, host_records, save_tensors


def _no_unknown_records(root: Path) -> None:
    assert host_records(root, "unknown") == []


@pytest.mark.slow
def test_the_readme_demo_trains_registers_and_prints_no_library_noise(tmp_path: Path) -> None:
    """The README's first command, `invokeai-ti demo`, as a newcomer runs it: a fresh process
    trains, registers the word with a new InvokeAI root, and its terminal holds our lines and
    progress bars, not the libraries' warnings (the host's model probing turns every warning
    back on, and its graph imports every node it ships)."""
    workdir = tmp_path / "demo"
    run = subprocess.run(
        [COMMAND, "demo", f"--workdir={workdir}", "--steps=2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "InvokeAI: registered <striped-ball> (sd-1); use it in prompts as <striped-ball>" in (
        run.stdout
    )
    (record,) = host_records(workdir / "invokeai-root")
    assert (record.name, record.base.value) == ("striped-ball", "sd-1")
    lines = run.stderr.replace("\r", "\n").splitlines()
    noise = [line for line in lines if re.search(r"warn|deprecat|fail|-->", line, re.IGNORECASE)]
    assert noise == []
    assert "training <striped-ball> for 2 steps" in run.stderr


def test_registering_leaves_the_warning_filters_as_they_were(
    host_root: Path, tmp_path: Path
) -> None:
    """The host's model probe ends by turning every warning on for the whole process; a library
    imported after it (onnx's protobuf, on Python 3.12) then printed its deprecation notice in
    the middle of the demo. Registering keeps the filters the process had."""
    warnings.simplefilter("ignore", DeprecationWarning)  # as outside __main__ by default
    before = list(warnings.filters)
    vectors = save_tensors(tmp_path / "ball.safetensors", {"emb_params": torch.randn(1, 768)})
    assert main(["import", str(vectors), "--name=ball", f"--root={host_root}"]) == 0
    assert warnings.filters == before


def test_list_models_shows_trainable_and_unsupported(
    capsys: pytest.CaptureFixture[str], host_root: Path, sd1_model: Path
) -> None:
    assert main(["--list-models", f"--root={host_root}"]) == 0
    shown = capsys.readouterr().out
    lines = {line.split()[0]: line for line in shown.splitlines()[1:]}
    assert "sd-1" in lines["tiny-sd-1"] and str(sd1_model.resolve()) in lines["tiny-sd-1"]
    assert "sd-2 v-pred" in lines["tiny-sd-2"] and "sdxl" in lines["tiny-sdxl"]
    assert "v-pred" not in lines["tiny-sd-1"] + lines["tiny-sdxl"]
    assert "not trainable: its files are missing" in lines["moved-away"]
    assert list(lines)[-1] == "moved-away"  # trainable models first


def test_training_by_model_name_registers_the_embedding(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path
) -> None:
    assert main(host_cli_args(host_root, object_images, "tiny-sd-1")) == 0
    assert "InvokeAI: registered <striped-ball> (sd-1)" in capsys.readouterr().out
    (record,) = host_records(host_root)
    target = host_root / "embeddings" / "striped-ball" / "sd-1" / "learned_embeds.safetensors"
    assert (record.name, record.base.value, record.format.value) == (
        "striped-ball",
        "sd-1",
        "embedding_file",
    )
    assert Path(record.path) == target.resolve()
    assert (target.parent / "embedding.json").is_file()
    assert (node_pack_folder(host_root) / "__init__.py").is_file()
    # the default output folder is the manual's, under the root
    assert (host_root / "text-inversion-output" / "striped-ball" / "embedding.json").is_file()
    _no_unknown_records(host_root)


def test_retraining_the_same_trigger_updates_it(host_root: Path, object_images: Path) -> None:
    assert main(host_cli_args(host_root, object_images, "tiny-sd-1", "--seed=1")) == 0
    target = host_root / "embeddings" / "striped-ball" / "sd-1" / "learned_embeds.safetensors"
    first = target.read_bytes()
    again = host_cli_args(host_root, object_images, "tiny-sd-1", "--seed=2", "--overwrite")
    assert main(again) == 0
    (record,) = host_records(host_root)
    assert record.name == "striped-ball" and target.read_bytes() != first
    _no_unknown_records(host_root)


def _cover(root: Path, key: str) -> Path:
    """Where InvokeAI's model manager keeps a model's cover image."""
    return root / "models" / "model_images" / f"{key}.webp"


def _related(root: Path, key: str) -> set[str]:
    with open_host_models(root) as models:
        return set(models.relationships.get_related_model_keys(key))


@pytest.mark.slow
def test_the_model_manager_shows_the_words_picture_and_model(
    host_root: Path, object_images: Path
) -> None:
    """The run's first sample is the embedding's cover image in InvokeAI's model manager, and
    it is related to the model it was trained on (the embedding picker's "related" filter); a
    retrained embedding gets its new run's picture, or keeps the old one when the run drew
    none, and keeps the relationships the user added."""
    samples = ["--num_validation_images=2", "--validation_steps=0"]
    assert main(host_cli_args(host_root, object_images, "tiny-sd-1", *samples)) == 0
    (first,) = host_records(host_root)
    assert first.description == "textual inversion <striped-ball>, trained on tiny-sd-1 for 2 steps"
    with open_host_models(host_root) as models:
        (sd1,) = find_installed_model(models, "tiny-sd-1")
        (sd2,) = find_installed_model(models, "tiny-sd-2")
        assert set(models.relationships.get_related_model_keys(first.key)) == {sd1.key}
        models.relationships.add_model_relationship(first.key, sd2.key)  # by the user
    (grid,) = (host_root / "text-inversion-output" / "striped-ball" / "samples").iterdir()
    with Image.open(grid) as drawn, Image.open(_cover(host_root, first.key)) as cover:
        assert cover.size == (64, 64)  # the host's (lossy) thumbnail of it, at most 256 px
        pixels = np.asarray(cover.convert("RGB"), dtype=float)
        tiles = [drawn.convert("RGB").crop((x, 0, x + 64, 64)) for x in (0, 64)]
        off = [np.abs(pixels - np.asarray(tile, dtype=float)).mean() for tile in tiles]
        assert off[0] < off[1] / 2, off  # the first sample, not the second
    first_cover = _cover(host_root, first.key).read_bytes()

    again = [*samples, "--overwrite", "--seed=9"]
    assert main(host_cli_args(host_root, object_images, "tiny-sd-1", *again)) == 0
    (second,) = host_records(host_root)
    assert not _cover(host_root, first.key).exists()  # no image of no record left behind
    assert _cover(host_root, second.key).read_bytes() != first_cover
    assert _related(host_root, second.key) == {sd1.key, sd2.key}
    assert _related(host_root, sd1.key) == {second.key}  # none of a record that is gone

    plain = ["--num_validation_images=0", "--overwrite"]
    assert main(host_cli_args(host_root, object_images, "tiny-sd-1", *plain)) == 0
    (third,) = host_records(host_root)
    assert _cover(host_root, third.key).is_file() and not _cover(host_root, second.key).exists()


def test_a_relationship_to_a_model_deleted_meanwhile_stops_nothing(
    host_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model trained on may be deleted while training runs: registering still ends well."""
    vectors = save_tensors(tmp_path / "ball.safetensors", {"emb_params": torch.randn(1, 768)})
    assert main(["import", str(vectors), "--name=ball", f"--root={host_root}"]) == 0
    (record,) = host_records(host_root)
    assert record.description == "textual inversion <ball>, imported from ball.safetensors"
    with open_host_models(host_root) as models, caplog.at_level(logging.WARNING):
        relate_models(models, record.key, "a-deleted-model")
    assert "not related to model a-deleted-model in InvokeAI" in caplog.text
    assert _related(host_root, record.key) == set()


def test_a_model_name_that_is_not_installed(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path
) -> None:
    assert main(host_cli_args(host_root, object_images, "no-such-model")) == 2
    assert "no model named 'no-such-model' is installed" in capsys.readouterr().err
    assert host_records(host_root) == []


def test_an_sd2_embedding_meets_an_sd1_model(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumable"
    sd2 = host_cli_args(host_root, object_images, "tiny-sd-2", f"--output_dir={out}")
    assert main([*sd2, "--no-register_embedding"]) == 0
    capsys.readouterr()

    resumed = host_cli_args(host_root, object_images, "tiny-sd-1", f"--output_dir={out}")
    assert main([*resumed, "--resume_from_checkpoint=latest"]) == 2
    expected = DIMENSION_MISMATCH.format(name="striped-ball", got=1024, want=768)
    assert expected in capsys.readouterr().err

    embedding = out / "learned_embeds.safetensors"
    assert main(["import", str(embedding), f"--root={host_root}", "--model=tiny-sd-1"]) == 2
    assert expected in capsys.readouterr().err
    assert host_records(host_root) == []
    _no_unknown_records(host_root)


def _concepts_library_folder(folder: Path) -> Path:
    folder.mkdir()
    torch.save({"<cat-toy>": torch.randn(768)}, folder / "learned_embeds.bin")
    (folder / "token_identifier.txt").write_text("<cat-toy>")
    (folder / "type_of_concept.txt").write_text("object")
    return folder


def _a1111_file(path: Path) -> Path:
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(torch.randn(2, 768))},
            "name": "painterly",
            "step": 1500,
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("make", "name", "base", "vectors"),
    [
        (lambda tmp: _concepts_library_folder(tmp / "cat-toy"), "cat-toy", "sd-1", 1),
        (lambda tmp: _a1111_file(tmp / "painterly.pt"), "painterly", "sd-1", 2),
        (
            lambda tmp: save_tensors(
                tmp / "kohya-style.safetensors", {"emb_params": torch.randn(3, 1024)}
            ),
            "kohya-style",
            "sd-2",
            3,
        ),
        (
            lambda tmp: save_tensors(
                tmp / "xl-thing.safetensors",
                {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
            ),
            "xl-thing",
            "sdxl",
            2,
        ),
        (  # diffusers' example output, which the host alone misreads as dimension 1
            lambda tmp: save_tensors(
                tmp / "diffusers.safetensors", {"<my-dog>": torch.randn(1, 768)}
            ),
            "my-dog",
            "sd-1",
            1,
        ),
    ],
)
def test_import_of_each_foreign_format(
    host_root: Path, tmp_path: Path, make, name: str, base: str, vectors: int
) -> None:
    from invokeai_ti_plugin.training.embedding_file import read_embedding_vectors

    source = make(tmp_path)
    assert main(["import", str(source), f"--root={host_root}"]) == 0
    (record,) = host_records(host_root)
    assert (record.name, record.base.value) == (name, base)
    stored = read_embedding_vectors(Path(record.path))
    assert stored.num_vectors == vectors and stored.host_reads_as_is
    _no_unknown_records(host_root)


class _RunsCode:
    """A pickle that would run a shell command when unpickled by plain `torch.load`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_nothing_runs(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "learned_embeds.bin"
    with evil.open("wb") as file:
        pickle.dump({"<evil>": _RunsCode(marker)}, file)
    assert main(["import", str(evil), f"--root={host_root}"]) == 2
    error = capsys.readouterr().err
    assert "refused" in error and "nothing in it was executed" in error
    assert not marker.exists()
    assert host_records(host_root) == []
    _no_unknown_records(host_root)


def test_garbage_and_unfit_files_leave_no_records(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "junk.safetensors"
    garbage.write_bytes(b"definitely not safetensors")
    assert main(["import", str(garbage), f"--root={host_root}"]) == 2
    odd = save_tensors(tmp_path / "odd.safetensors", {"emb_params": torch.randn(1, 512)})
    assert main(["import", str(odd), f"--root={host_root}"]) == 2
    assert "fit no Stable Diffusion base" in capsys.readouterr().err
    assert host_records(host_root) == []
    _no_unknown_records(host_root)


def test_startup_registers_dropped_files_and_reports_the_rest(host_root: Path) -> None:
    folder = host_root / "embeddings"
    (folder / "dropped").mkdir(parents=True)
    dropped = folder / "dropped" / "learned_embeds.safetensors"
    save_tensors(dropped, {"emb_params": torch.randn(1, 768)})
    save_tensors(folder / "wide.safetensors", {"emb_params": torch.randn(2, 1024)})
    save_tensors(folder / "odd.safetensors", {"emb_params": torch.randn(1, 100)})
    (folder / "broken.pt").write_bytes(b"junk")
    with open_host_models(host_root) as models:
        report = sync_embeddings(models)
    assert sorted(report.registered) == ["dropped", "wide"]
    assert len(report.refused) == 2
    assert any("odd.safetensors" in line and "fit no" in line for line in report.refused)

    records = {record.name: record.base.value for record in host_records(host_root)}
    assert records == {"dropped": "sd-1", "wide": "sd-2"}
    (folder / "wide.safetensors").unlink()
    with open_host_models(host_root) as models:
        again = sync_embeddings(models)
    assert again.registered == [] and len(again.missing) == 1 and "<wide>" in again.missing[0]
    _no_unknown_records(host_root)


def test_an_embedding_deleted_in_the_model_manager_stays_deleted(
    host_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """InvokeAI's Delete leaves files outside ROOT/models/, so the start-up scan must not bring
    the embeddings back; a file that arrives, or new content at a deleted one's path, is still
    registered, and an import brings a deleted one back."""
    folder = host_root / "embeddings"
    imported = save_tensors(tmp_path / "kept.safetensors", {"emb_params": torch.randn(1, 768)})
    assert main(["import", str(imported), "--name=kept-away", f"--root={host_root}"]) == 0
    (folder / "dropped").mkdir(parents=True)
    vectors = {"emb_params": torch.randn(1, 768)}
    dropped = save_tensors(folder / "dropped" / "x.safetensors", vectors)
    with open_host_models(host_root) as models:
        assert sync_embeddings(models).registered == ["dropped"]
        for record in host_records(host_root):
            models.installer.delete(record.key)  # what the model manager's Delete button does
    stored = folder / "kept-away" / "sd-1" / "learned_embeds.safetensors"
    assert stored.is_file() and dropped.is_file() and host_records(host_root) == []

    save_tensors(folder / "arrived.safetensors", {"emb_params": torch.randn(1, 768)})
    with open_host_models(host_root) as models, caplog.at_level(logging.INFO):
        report = sync_embeddings(models)
    assert report.registered == ["arrived"]
    assert sorted(report.deleted) == sorted([stored, dropped])
    assert "not registering again embeddings deleted in InvokeAI's model manager" in caplog.text
    assert {record.name for record in host_records(host_root)} == {"arrived"}

    save_tensors(dropped, {"emb_params": torch.randn(1, 768)})  # new content: a new arrival
    assert main(["import", str(stored), f"--root={host_root}"]) == 0
    with open_host_models(host_root) as models:
        assert sync_embeddings(models).registered == ["dropped"]
    names = {record.name for record in host_records(host_root)}
    assert names == {"arrived", "dropped", "kept-away"}


def test_linked_embeddings_register_once_and_stay_deleted(host_root: Path, tmp_path: Path) -> None:
    """Users link in the embeddings they share with A1111 or ComfyUI: a linked folder (its
    sub-folders too, a link loop in it ending) and a linked file are registered once each, by
    their paths in ROOT/embeddings/, and once deleted in the model manager they stay deleted."""
    shared = tmp_path / "a1111-embeddings"
    (shared / "more").mkdir(parents=True)
    save_tensors(shared / "style.safetensors", {"emb_params": torch.randn(1, 768)})
    xl = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    save_tensors(shared / "more" / "painter.safetensors", xl)
    save_tensors(shared / "more" / "sculptor.safetensors", xl)
    (shared / "more" / "loop").symlink_to(shared, target_is_directory=True)
    alone = save_tensors(tmp_path / "alone.safetensors", {"emb_params": torch.randn(1, 1024)})
    folder = host_root / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shared").symlink_to(shared, target_is_directory=True)
    (folder / "alone.safetensors").symlink_to(alone)
    (folder / "again").symlink_to(shared, target_is_directory=True)  # the same folder twice

    with open_host_models(host_root) as models:
        report = sync_embeddings(models)
    assert sorted(report.registered) == ["alone", "painter", "sculptor", "style"], report
    records = {record.name: record.base.value for record in host_records(host_root)}
    assert records == {"alone": "sd-2", "painter": "sdxl", "sculptor": "sdxl", "style": "sd-1"}

    with open_host_models(host_root) as models:
        for record in host_records(host_root):
            models.installer.delete(record.key)  # the model manager's Delete button
        again = sync_embeddings(models)
    assert again.registered == [] and len(again.deleted) == 4, again
    assert host_records(host_root) == []


def test_an_import_beside_a_running_scan_keeps_both_in_the_list(
    host_root: Path, tmp_path: Path
) -> None:
    """A start-up scan holds the list while it hashes and registers; an import (or a training
    run) that registers meanwhile must not be dropped when the scan writes the list back, or
    its embedding, once deleted, would come back at the next start."""
    folder = host_root / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    scanned = save_tensors(folder / "scanned.safetensors", {"emb_params": torch.randn(1, 768)})
    scan = RegisteredFiles(host_root)  # loaded before the import
    imported = save_tensors(tmp_path / "ball.safetensors", {"emb_params": torch.randn(1, 768)})
    assert main(["import", str(imported), "--name=meanwhile", f"--root={host_root}"]) == 0
    scan.add(scanned)
    scan.save()
    stored = folder / "meanwhile" / "sd-1" / "learned_embeds.safetensors"
    listed = json.loads((folder / LIST_FILENAME).read_text())
    assert sorted(listed) == ["meanwhile/sd-1/learned_embeds.safetensors", "scanned.safetensors"]

    with open_host_models(host_root) as models:
        for record in host_records(host_root):
            models.installer.delete(record.key)
        report = sync_embeddings(models)
    assert report.registered == []
    assert sorted(report.deleted) == sorted([stored, scanned])


# another process's read-merge-write of the list, held open between its read and its write
_OTHER_WRITER = """
import json, sys
from pathlib import Path
from invokeai_ti_plugin.atomic_files import write_json_atomically
from invokeai_ti_plugin.host.registered_files import LIST_FILENAME, list_lock
folder = Path(sys.argv[1])
with list_lock(folder):
    path = folder / LIST_FILENAME
    entries = json.loads(path.read_text()) if path.is_file() else {}
    print("read", flush=True)
    sys.stdin.readline()
    write_json_atomically(path, {**entries, "other.safetensors": "its fingerprint"})
"""


@contextmanager
def _other_writer_between_read_and_write(folder: Path) -> Iterator[subprocess.Popen[str]]:
    """`_OTHER_WRITER` started and stopped after its read; a line on its stdin lets it write.
    Killed at the end, whatever happened."""
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_WRITER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "read\n"
        yield other
    finally:
        other.kill()


def test_two_processes_writing_the_list_at_once_keep_both_entries(host_root: Path) -> None:
    """The list is read, merged and written under a lock: a process that writes it back while
    another is between its read and its write waits, instead of being written over."""
    folder = host_root / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "other.safetensors").write_bytes(b"another process's embedding")
    ours = save_tensors(folder / "ours.safetensors", {"emb_params": torch.randn(1, 768)})
    with _other_writer_between_read_and_write(folder) as other:
        registered = RegisteredFiles(host_root)
        registered.add(ours)
        saving = threading.Thread(target=registered.save)
        saving.start()
        saving.join(timeout=1.0)
        assert saving.is_alive()  # waiting for the other process's write
        assert other.communicate("go\n", timeout=60)[1] is None and other.returncode == 0
        saving.join(timeout=60)
        assert not saving.is_alive()
    listed = json.loads((folder / LIST_FILENAME).read_text())
    assert sorted(listed) == ["other.safetensors", "ours.safetensors"]


def test_a_list_lock_held_too_long_does_not_hold_up_registering(
    host_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stuck while holding the lock: the list is best effort, so after the wait the
    write goes ahead without it."""
    folder = host_root / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    ours = save_tensors(folder / "ours.safetensors", {"emb_params": torch.randn(1, 768)})
    with _other_writer_between_read_and_write(folder):  # and never let go on
        monkeypatch.setattr(registered_files, "LOCK_WAIT_SECONDS", 0.2)
        registered = RegisteredFiles(host_root)
        registered.add(ours)
        registered.save()
        assert list(json.loads((folder / LIST_FILENAME).read_text())) == ["ours.safetensors"]


def test_a_list_of_embeddings_that_cannot_be_written_stops_nothing(
    host_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The list that keeps deletions deleted is best effort: the embedding is registered."""
    (host_root / "embeddings" / LIST_FILENAME).mkdir(parents=True)  # cannot become a file
    vectors = save_tensors(tmp_path / "ball.safetensors", {"emb_params": torch.randn(1, 768)})
    with caplog.at_level(logging.WARNING):
        assert main(["import", str(vectors), "--name=listless", f"--root={host_root}"]) == 0
    assert [record.name for record in host_records(host_root)] == ["listless"]
    assert "an embedding deleted in InvokeAI's model manager may be registered again" in (
        caplog.text
    )


def test_name_clash_with_another_embedding_is_refused(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path, object_images: Path
) -> None:
    other = save_tensors(tmp_path / "striped-ball.safetensors", {"emb_params": torch.randn(1, 768)})
    with open_host_models(host_root) as models:  # installed by hand in InvokeAI's model manager
        models.installer.register_path(other)
    assert main(host_cli_args(host_root, object_images, "tiny-sd-1")) == 2
    assert "already has a sd-1 embedding named <striped-ball>" in capsys.readouterr().err
    assert len(host_records(host_root)) == 1


def test_install_nodes_is_idempotent(capsys: pytest.CaptureFixture[str], host_root: Path) -> None:
    assert main(["install-nodes", f"--root={host_root}"]) == 0
    assert main(["install-nodes", f"--root={host_root}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("Already installed")


@pytest.mark.slow
def test_two_processes_train_together_and_register_once(
    host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    """torchrun on CPU: accelerate's gloo path, as `accelerate launch` uses on GPUs."""
    out = tmp_path / "out"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = host_cli_args(host_root, object_images, "tiny-sd-1", f"--output_dir={out}")
    run = subprocess.run(
        [torchrun, "--nproc_per_node=2", "-m", "invokeai_ti_plugin.cli", *args, "--seed=4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "x 2 processes" in run.stderr
    assert run.stdout.count("InvokeAI: registered <striped-ball> (sd-1)") == 1
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("random_state_*.pt")) == [
        "random_state_0.pt",
        "random_state_1.pt",
    ]
    assert [record.name for record in host_records(host_root)] == ["striped-ball"]
    # the main process alone measured the evaluation loss and wrote the history, once a step
    evaluation = json.loads((out / "embedding.json").read_text())["evaluation"]
    assert evaluation["last_step"] == 2 and evaluation["start"] > 0 and evaluation["last"] > 0
    history = (out / "logs" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2]
