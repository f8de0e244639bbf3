"""Names that never climb, one embedding per name and base, broken vectors never registered.

Everything runs on the real host database of a throw-away root; each test checks what is left
on disk and in the host's model records.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import name_problem
from invokeai_ti_plugin.errors import UserInputError
from invokeai_ti_plugin.host.embedding_sync import sync_embeddings
from invokeai_ti_plugin.host.embeddings import register_embedding_file
from invokeai_ti_plugin.host.model_db import open_host_models
from invokeai_ti_plugin.training.embedding_file import (
    EmbeddingVectors,
    read_embedding_vectors,
    save_vectors,
)

from .conftest import host_cli_args, host_records, save_tensors

CLIMBING = ["..", ".", "..."]
EMBEDS = "learned_embeds.safetensors"


def _files(folder: Path) -> dict[Path, tuple[int, int]]:
    """Every file under `folder`, with its size and modification time."""
    return {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


def _records(root: Path) -> set[tuple[str, str]]:
    return {(record.name, record.base.value) for record in host_records(root)}


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


# -- names never climb -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLIMBING)
def test_a_trigger_of_dots_is_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str],
    host_root: Path,
    object_images: Path,
    tmp_path: Path,
    name: str,
) -> None:
    before = _files(tmp_path)
    args = host_cli_args(host_root, object_images, "tiny-sd-1", f"--placeholder_token=<{name}>")
    assert main(args) == 2
    assert "--placeholder_token" in _one_line_error(capsys)
    assert _files(tmp_path) == before
    assert not (host_root / EMBEDS).exists() and not (host_root / "checkpoints").exists()


def _named_by_metadata(folder: Path, name: str) -> Path:
    return _save_with(folder / "evil.safetensors", {"emb_params": torch.randn(1, 768)}, name)


def _save_with(path: Path, tensors: dict[str, torch.Tensor], name: str) -> Path:
    save_file(tensors, str(path), {"name": name})
    return path


def _named_by_a1111(folder: Path, name: str) -> Path:
    params = {"*": torch.nn.Parameter(torch.randn(1, 768))}
    a1111 = {"string_to_param": params, "string_to_token": {"*": 265}, "name": name}
    torch.save(a1111, folder / "evil.pt")
    return folder / "evil.pt"


def _named_by_token(folder: Path, name: str) -> Path:
    torch.save({f"<{name}>": torch.randn(768)}, folder / "evil.bin")
    return folder / "evil.bin"


@pytest.mark.parametrize("make", [_named_by_metadata, _named_by_a1111, _named_by_token])
@pytest.mark.parametrize("name", CLIMBING)
def test_import_refuses_a_name_of_dots_from_the_file(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path, make, name: str
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    file = make(source, name)
    before = _files(tmp_path)
    assert main(["import", str(file), f"--root={host_root}"]) == 2
    error = _one_line_error(capsys)
    assert repr(name) in error and "pass --name" in error
    assert _files(tmp_path) == before
    assert host_records(host_root) == []


@pytest.mark.parametrize("name", ["con", "NUL", "Com1", "lpt9.old", "aux.", "ball."])
def test_names_windows_cannot_give_a_folder_are_refused_everywhere(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path, name: str
) -> None:
    """A folder of InvokeAI's root may move to Windows, where these are devices or lose their
    last dot (two names, one folder)."""
    args = host_cli_args(host_root, object_images, "tiny-sd-1", f"--placeholder_token=<{name}>")
    assert main(args) == 2
    assert "Windows" in _one_line_error(capsys)
    assert not (host_root / "text-inversion-output").exists()


def test_names_that_only_begin_like_a_windows_device_are_fine() -> None:
    assert [name_problem(name) for name in ("console", "nullify", "com10", "ball.v2")] == [None] * 4


@pytest.mark.parametrize("name", [*CLIMBING, ".hidden"])
def test_import_refuses_a_name_of_dots_given_with_name(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path, name: str
) -> None:
    file = save_tensors(tmp_path / "fine.safetensors", {"emb_params": torch.randn(1, 768)})
    before = _files(tmp_path)
    assert main(["import", str(file), f"--root={host_root}", f"--name={name}"]) == 2
    assert f"{name!r} cannot name an embedding" in _one_line_error(capsys)
    assert _files(tmp_path) == before
    assert host_records(host_root) == []


def test_a_name_folder_that_links_outside_is_refused(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (host_root / "embeddings").mkdir(exist_ok=True)
    (host_root / "embeddings" / "linked").symlink_to(elsewhere)
    file = save_tensors(tmp_path / "fine.safetensors", {"emb_params": torch.randn(1, 768)})
    assert main(["import", str(file), f"--root={host_root}", "--name=linked"]) == 2
    assert "leads outside" in _one_line_error(capsys)
    assert list(elsewhere.iterdir()) == []
    assert host_records(host_root) == []


# -- one embedding per name and base -----------------------------------------------------------


def _stored(root: Path, name: str, base: str) -> Path:
    return root / "embeddings" / name / base / EMBEDS


def _host_picks(root: Path, name: str, base: str) -> Path:
    """The file the host loads for `<name>` with a main model of `base` (its load_by_attrs)."""
    from invokeai.backend.model_manager.taxonomy import BaseModelType, ModelType

    with open_host_models(root) as models:
        (record,) = models.store.search_by_attr(
            model_name=name, base_model=BaseModelType(base), model_type=ModelType.TextualInversion
        )
        return models.absolute(record.path)


def test_one_name_on_two_bases_keeps_both_and_only_the_same_base_is_updated(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    sd1 = save_tensors(tmp_path / "a.safetensors", {"emb_params": torch.randn(2, 768)})
    xl = save_tensors(
        tmp_path / "b.safetensors", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}
    )
    assert main(["import", str(sd1), f"--root={host_root}", "--name=dup"]) == 0
    assert main(["import", str(xl), f"--root={host_root}", "--name=dup"]) == 0
    out = capsys.readouterr().out
    assert "registered <dup> (sd-1)" in out and "registered <dup> (sdxl)" in out
    assert "updated" not in out
    assert _records(host_root) == {("dup", "sd-1"), ("dup", "sdxl")}
    for base, source in (("sd-1", sd1), ("sdxl", xl)):
        assert _host_picks(host_root, "dup", base) == _stored(host_root, "dup", base).resolve()
        stored = read_embedding_vectors(_stored(host_root, "dup", base)).tensors
        expected = read_embedding_vectors(source).tensors
        assert all(torch.equal(stored[key], expected[key]) for key in expected)
    xl_bytes = _stored(host_root, "dup", "sdxl").read_bytes()
    xl_key = {r.base.value: r.key for r in host_records(host_root)}["sdxl"]

    again = save_tensors(tmp_path / "c.safetensors", {"emb_params": torch.randn(3, 768)})
    assert main(["import", str(again), f"--root={host_root}", "--name=dup"]) == 0
    assert "InvokeAI: updated <dup> (sd-1)" in capsys.readouterr().out
    assert _records(host_root) == {("dup", "sd-1"), ("dup", "sdxl")}
    assert read_embedding_vectors(_stored(host_root, "dup", "sd-1")).num_vectors == 3
    assert _stored(host_root, "dup", "sdxl").read_bytes() == xl_bytes
    assert {r.base.value: r.key for r in host_records(host_root)}["sdxl"] == xl_key


def test_a_name_that_differs_only_in_case_is_refused_on_the_same_base(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    """<Ball> after <ball>: one folder on Windows and macOS, where the second would overwrite
    the first's file under its record."""
    first = save_tensors(tmp_path / "a.safetensors", {"emb_params": torch.randn(1, 768)})
    second = save_tensors(tmp_path / "b.safetensors", {"emb_params": torch.randn(1, 768)})
    xl = save_tensors(
        tmp_path / "c.safetensors", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}
    )
    assert main(["import", str(first), f"--root={host_root}", "--name=ball"]) == 0
    stored = _stored(host_root, "ball", "sd-1").read_bytes()
    capsys.readouterr()
    assert main(["import", str(second), f"--root={host_root}", "--name=Ball"]) == 2
    assert "named <ball>, which differs from <Ball> only in case" in _one_line_error(capsys)
    assert _records(host_root) == {("ball", "sd-1")}
    assert _stored(host_root, "ball", "sd-1").read_bytes() == stored
    assert not (host_root / "embeddings" / "Ball").exists()
    # on another base the folders differ (ball/sd-1, Ball/sdxl): both are kept
    assert main(["import", str(xl), f"--root={host_root}", "--name=Ball"]) == 0
    assert _records(host_root) == {("ball", "sd-1"), ("Ball", "sdxl")}


@pytest.mark.slow
def test_training_one_trigger_on_two_bases_keeps_both(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    def train(model: str, run: str, seed: int) -> str:
        args = host_cli_args(host_root, object_images, model, "--placeholder_token=<dup>")
        assert main([*args, f"--output_dir={tmp_path / run}", f"--seed={seed}"]) == 0
        return capsys.readouterr().out

    assert "InvokeAI: registered <dup> (sd-1)" in train("tiny-sd-1", "one", 1)
    assert "InvokeAI: registered <dup> (sd-2)" in train("tiny-sd-2", "two", 1)
    assert _records(host_root) == {("dup", "sd-1"), ("dup", "sd-2")}
    sd1_bytes = _stored(host_root, "dup", "sd-1").read_bytes()
    sd2_bytes = _stored(host_root, "dup", "sd-2").read_bytes()

    assert "InvokeAI: updated <dup> (sd-2)" in train("tiny-sd-2", "three", 2)
    assert _records(host_root) == {("dup", "sd-1"), ("dup", "sd-2")}
    assert _stored(host_root, "dup", "sd-1").read_bytes() == sd1_bytes
    assert _stored(host_root, "dup", "sd-2").read_bytes() != sd2_bytes
    for base in ("sd-1", "sd-2"):
        assert _host_picks(host_root, "dup", base) == _stored(host_root, "dup", base).resolve()


def _legacy(root: Path, name: str, tensors: dict[str, torch.Tensor], base: str) -> Path:
    """An embedding stored and registered the way earlier versions did: embeddings/<name>/."""
    file = root / "embeddings" / name / EMBEDS
    file.parent.mkdir(parents=True)
    save_file(tensors, str(file))
    dim = tensors["emb_params"].shape[1]
    sidecar = {"name": name, "base": base, "token_dimension": str(dim)}
    (file.parent / "embedding.json").write_text(json.dumps(sidecar))
    with open_host_models(root) as models:
        register_embedding_file(models, file, name, read_embedding_vectors(file))
    return file


def test_the_layout_of_earlier_versions_is_read_and_replaced_only_on_its_own_base(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    old_sd1 = _legacy(host_root, "dup", {"emb_params": torch.randn(1, 768)}, "sd-1")
    old_sd2 = _legacy(host_root, "wide", {"emb_params": torch.randn(1, 1024)}, "sd-2")
    sd2_bytes = old_sd2.read_bytes()
    new = save_tensors(tmp_path / "new.safetensors", {"emb_params": torch.randn(2, 768)})

    assert main(["import", str(new), f"--root={host_root}", "--name=dup"]) == 0
    assert main(["import", str(new), f"--root={host_root}", "--name=wide"]) == 0
    out = capsys.readouterr().out
    assert "InvokeAI: updated <dup> (sd-1)" in out  # our own old result, same name and base
    assert "InvokeAI: registered <wide> (sd-1)" in out  # another base: the old one stays
    assert not old_sd1.exists() and not (old_sd1.parent / "embedding.json").exists()
    assert old_sd2.read_bytes() == sd2_bytes
    paths = {(r.name, r.base.value): Path(r.path) for r in host_records(host_root)}
    assert paths == {
        ("dup", "sd-1"): _stored(host_root, "dup", "sd-1").resolve(),
        ("wide", "sd-1"): _stored(host_root, "wide", "sd-1").resolve(),
        ("wide", "sd-2"): old_sd2.resolve(),
    }
    with open_host_models(host_root) as models:  # a restart: nothing new, nothing twice
        report = sync_embeddings(models)
    assert (report.registered, report.refused, report.missing) == ([], [], [])
    assert len(host_records(host_root)) == 3


def test_startup_names_files_of_each_layout_and_registers_each_once(host_root: Path) -> None:
    folder = host_root / "embeddings"
    for base, tensors in (
        ("sd-1", {"emb_params": torch.randn(1, 768)}),
        ("sdxl", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}),
    ):
        (folder / "dup" / base).mkdir(parents=True)
        save_file(tensors, str(folder / "dup" / base / EMBEDS))
        dim = tensors["clip_g" if base == "sdxl" else "emb_params"].shape[1]
        sidecar = {"name": "dup", "base": base, "token_dimension": str(dim)}
        (folder / "dup" / base / "embedding.json").write_text(json.dumps(sidecar))
    (folder / "plain" / "sd-2").mkdir(parents=True)  # our layout, without its embedding.json
    save_tensors(folder / "plain" / "sd-2" / EMBEDS, {"emb_params": torch.randn(1, 1024)})
    (folder / "sd-1").mkdir()  # a user's own folder per base: a base never names an embedding
    loose = save_tensors(folder / "sd-1" / "loose.safetensors", {"emb_params": torch.randn(1, 768)})
    (folder / "zz-link.safetensors").symlink_to(loose)  # the same file again
    (folder / "evil").mkdir()
    save_tensors(folder / "evil" / EMBEDS, {"emb_params": torch.randn(1, 768)})
    (folder / "evil" / "embedding.json").write_text(json.dumps({"name": ".."}))

    with open_host_models(host_root) as models:
        report = sync_embeddings(models)
    assert sorted(report.registered) == ["dup", "dup", "loose", "plain"]
    assert len(report.refused) == 1 and "'..' cannot name an embedding" in report.refused[0]
    expected = {("dup", "sd-1"), ("dup", "sdxl"), ("plain", "sd-2"), ("loose", "sd-1")}
    assert _records(host_root) == expected
    assert not (host_root / EMBEDS).exists()
    with open_host_models(host_root) as models:
        again = sync_embeddings(models)
    assert again.registered == [] and len(again.refused) == 1
    assert len(host_records(host_root)) == 4


# -- broken vectors are never written or registered --------------------------------------------


def _with_nan() -> dict[str, torch.Tensor]:
    rows = torch.randn(1, 768)
    rows[0, 5] = float("nan")
    return {"emb_params": rows}


def _with_inf() -> dict[str, torch.Tensor]:
    rows = torch.randn(2, 768)
    rows[1, 0] = float("inf")
    return {"emb_params": rows}


BROKEN = {
    "nan": (_with_nan, "NaN or infinite"),
    "inf": (_with_inf, "NaN or infinite"),
    "zero-rows": (lambda: {"emb_params": torch.zeros(0, 768)}, "holds 0 vectors"),
    "76-rows": (lambda: {"emb_params": torch.randn(76, 768)}, "holds 76 vectors"),
    "halves": (
        lambda: {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)},
        "clip_l 2, clip_g 3",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_vectors_are_refused_at_import_and_at_startup(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path, kind: str
) -> None:
    make, reason = BROKEN[kind]
    file = save_tensors(tmp_path / f"{kind}.safetensors", make())
    assert main(["import", str(file), f"--root={host_root}"]) == 2
    assert reason in _one_line_error(capsys)
    assert _files(host_root / "embeddings") == {}
    assert host_records(host_root) == []

    dropped = host_root / "embeddings" / kind / EMBEDS
    dropped.parent.mkdir(parents=True)
    shutil.copy(file, dropped)
    with open_host_models(host_root) as models:
        report = sync_embeddings(models)
    assert report.registered == []
    assert len(report.refused) == 1 and reason in report.refused[0]
    assert host_records(host_root) == []
    assert host_records(host_root, "unknown") == []


def test_a_prompt_full_of_vectors_is_still_accepted(host_root: Path, tmp_path: Path) -> None:
    file = save_tensors(tmp_path / "full.safetensors", {"emb_params": torch.randn(75, 768)})
    assert main(["import", str(file), f"--root={host_root}"]) == 0
    assert read_embedding_vectors(_stored(host_root, "full", "sd-1")).num_vectors == 75


def test_broken_vectors_are_never_written(tmp_path: Path) -> None:
    """The trainer's final embedding and its checkpoints are all written by save_vectors."""
    target = tmp_path / "out" / EMBEDS
    for make, reason in BROKEN.values():
        with pytest.raises(UserInputError, match=reason):
            save_vectors(target, EmbeddingVectors(make()), {})
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_too_many_vectors_is_a_validation_error(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    before = _files(tmp_path)
    assert main(host_cli_args(host_root, object_images, "tiny-sd-1", "--num_vectors=76")) == 2
    assert "--num_vectors: must be at most 75" in _one_line_error(capsys)
    assert _files(tmp_path) == before


def _deflated_bomb(path: Path, rows: int) -> Path:
    """torch.save's archive of rows x 768 zeros, re-packed with zip deflate: a tiny file."""
    buffer = io.BytesIO()
    torch.save({"emb_params": torch.zeros(rows, 768)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as plain, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for entry in plain.infolist():
            with plain.open(entry) as source, out.open(entry.filename, "w") as target:
                shutil.copyfileobj(source, target, 2**20)
    return path


@pytest.mark.slow
def test_a_deflated_bomb_is_refused_before_it_is_inflated(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    bomb = _deflated_bomb(tmp_path / "bomb.pt", 200_000)
    assert bomb.stat().st_size < 2**20  # 586 MB of vectors in under 1 MB
    started = time.perf_counter()
    with pytest.raises(UserInputError, match=r"unpacks to 586 MB.*it was not loaded"):
        read_embedding_vectors(bomb)
    assert time.perf_counter() - started < 0.5

    assert main(["import", str(bomb), f"--root={host_root}"]) == 2
    assert "unpacks to 586 MB" in _one_line_error(capsys)
    dropped = host_root / "embeddings" / "bomb.pt"
    dropped.parent.mkdir()
    shutil.copy(bomb, dropped)
    with open_host_models(host_root) as models:
        report = sync_embeddings(models)
    assert len(report.refused) == 1 and "unpacks to 586 MB" in report.refused[0]
    assert host_records(host_root) == [] and host_records(host_root, "unknown") == []
