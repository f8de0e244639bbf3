"""Every embedding in and out: each foreign layout built the way its writer builds it, imported
into a real root, and read back by the host's own loader; exports read by the loading rules A1111,
ComfyUI and diffusers follow."""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.training.a1111_image import lcg_nibbles

from .conftest import host_records

EMBEDS = "learned_embeds.safetensors"
ACCEPTED = "accepted are embeddings in .safetensors"


def _vectors(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def _import(root: Path, *sources: Path, extra: tuple[str, ...] = ()) -> int:
    return main(["import", *map(str, sources), f"--root={root}", *extra])


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def _host_reads(root: Path, name: str, base: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The vectors the host's own loader gives for the one record of that name and base."""
    from invokeai.backend.textual_inversion import TextualInversionModelRaw

    (record,) = [r for r in host_records(root) if (r.name, r.base.value) == (name, base)]
    loaded = TextualInversionModelRaw.from_checkpoint(Path(record.path))
    return loaded.embedding, loaded.embedding_2


def _stored(root: Path, name: str, base: str) -> tuple[dict[str, str], dict[str, object]]:
    """Our stored file's metadata and its embedding.json."""
    folder = root / "embeddings" / name / base
    with safe_open(str(folder / EMBEDS), framework="pt") as file:
        metadata = dict(file.metadata() or {})
    return metadata, json.loads((folder / "embedding.json").read_text())


def _only_records(root: Path, *expected: tuple[str, str]) -> None:
    assert sorted((r.name, r.base.value) for r in host_records(root)) == sorted(expected)
    assert host_records(root, "unknown") == []


# -- 1. diffusers' SDXL example: two files per embedding -----------------------------------------


def _diffusers_sdxl_output(folder: Path, token: str) -> dict[str, torch.Tensor]:
    """What textual_inversion_sdxl.py leaves: {token: [n, 768]} and {token: [n, 1280]}, with
    -steps-N snapshots of both, each written by safetensors with metadata {"format": "pt"}."""
    folder.mkdir()
    final = {"clip_l": _vectors(2, 768, 1), "clip_g": _vectors(2, 1280, 2)}
    for stem, key, seed in (("learned_embeds", "clip_l", 3), ("learned_embeds_2", "clip_g", 4)):
        width = final[key].shape[1]
        snapshot = {token: _vectors(2, width, seed)}
        save_file(snapshot, str(folder / f"{stem}-steps-500.safetensors"), {"format": "pt"})
        save_file({token: final[key]}, str(folder / f"{stem}.safetensors"), {"format": "pt"})
    return final


@pytest.mark.parametrize(
    "pick",
    [
        lambda folder: [folder],
        lambda folder: [folder / EMBEDS],
        lambda folder: [folder / "learned_embeds_2.safetensors"],
        lambda folder: [folder / EMBEDS, folder / "learned_embeds_2.safetensors"],
    ],
    ids=["folder", "first-file", "second-file", "both-files"],
)
def test_diffusers_sdxl_pair_is_one_sdxl_embedding(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path, pick
) -> None:
    final = _diffusers_sdxl_output(tmp_path / "cat-toy-output", "<cat-toy>")
    assert _import(host_root, *pick(tmp_path / "cat-toy-output")) == 0
    assert "registered <cat-toy> (sdxl)" in capsys.readouterr().out
    _only_records(host_root, ("cat-toy", "sdxl"))
    embedding, embedding_2 = _host_reads(host_root, "cat-toy", "sdxl")
    assert torch.equal(embedding, final["clip_g"]) and torch.equal(embedding_2, final["clip_l"])
    metadata, facts = _stored(host_root, "cat-toy", "sdxl")
    assert metadata["placeholder_token"] == "<cat-toy>" and metadata["format"] == "pt"
    assert "learned_embeds_2.safetensors" in str(facts["imported_from"])


def test_a_snapshot_pair_alone_is_imported_and_two_of_one_name_are_refused(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    _diffusers_sdxl_output(folder, "<cat-toy>")
    for stem in ("learned_embeds", "learned_embeds_2"):
        (folder / f"{stem}.safetensors").unlink()  # a run stopped before its final save
    snapshot = folder / "learned_embeds-steps-500.safetensors"
    assert _import(host_root, snapshot) == 0
    _only_records(host_root, ("cat-toy", "sdxl"))
    embedding, _ = _host_reads(host_root, "cat-toy", "sdxl")
    assert torch.equal(embedding, _vectors(2, 1280, 4))
    capsys.readouterr()

    save_file({"<cat-toy>": _vectors(2, 768, 5)}, str(folder / "learned_embeds-steps-900.bin"))
    save_file({"<cat-toy>": _vectors(2, 1280, 6)}, str(folder / "learned_embeds_2-steps-900.bin"))
    assert _import(host_root, folder) == 2
    assert "are both the sdxl embedding <cat-toy>" in _one_error(capsys)


def test_files_named_like_a_pair_that_are_not_one_are_read_alone(
    host_root: Path, tmp_path: Path
) -> None:
    save_file({"emb_params": _vectors(1, 768, 1)}, str(tmp_path / "style.safetensors"))
    save_file({"emb_params": _vectors(2, 768, 2)}, str(tmp_path / "style_2.safetensors"))
    _text(tmp_path / "learned_embeds_2.bin")
    torch.save({"<knot>": _vectors(1, 768, 3)}, tmp_path / "learned_embeds.bin")
    sources = ("style.safetensors", "style_2.safetensors", "learned_embeds.bin")
    assert _import(host_root, *(tmp_path / source for source in sources)) == 0
    _only_records(host_root, ("style", "sd-1"), ("style_2", "sd-1"), ("knot", "sd-1"))
    assert torch.equal(_host_reads(host_root, "style_2", "sd-1")[0], _vectors(2, 768, 2))
    assert torch.equal(_host_reads(host_root, "knot", "sd-1")[0], _vectors(1, 768, 3))


# -- 2. A1111 embeddings saved as PNG images ---------------------------------------------------


def _a1111_data(vectors: torch.Tensor, name: str) -> dict[str, object]:
    """What A1111's Embedding.save writes, the dictionary its PNGs carry too."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": 1500,
        "sd_checkpoint": "e1441589a6",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }


def _a1111_json(data: dict[str, object]) -> bytes:
    """A1111's JSON: each tensor as {"TORCHTENSOR": nested lists}."""

    def tensors(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return {"TORCHTENSOR": value.numpy().tolist()}
        raise TypeError(value)

    return json.dumps(data, default=tensors).encode()


def _picture(size: tuple[int, int] = (48, 40)) -> Image.Image:
    picture = Image.new("RGB", size, (40, 120, 200))
    ImageDraw.Draw(picture).ellipse((8, 8, 30, 30), fill=(250, 200, 20))
    return picture


def _png_with_text(path: Path, data: dict[str, object]) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(_a1111_json(data)))
    _picture().save(path, "PNG", pnginfo=info)
    return path


def _lcg_stream(count: int) -> np.ndarray:
    """A1111's generator as it defines it: state = (1664525 state + 1013904223) mod 2^32 from 0,
    each value state mod 255; the hiding uses its low 4 bits."""
    state, values = 0, []
    for _ in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        values.append(state % 255)
    return np.array(values, dtype=np.uint8) & 0x0F


def _decorated(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """Grey dots drawn into the high 4 bits, as A1111 draws them from the first vector."""
    art = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(art)
    for index, (x, y) in enumerate(
        (x, y) for x in range(-6, art.width, 8) for y in range(-6, art.height, 8)
    ):
        shade = int(shades[index % len(shades)])
        offset = 4 if (y + 6) // 8 % 2 == 0 else 0
        draw.ellipse((x + offset, y, x + offset + 6, y + 6), fill=(shade, shade, shade))
    return block ^ (np.asarray(art) & 0xF0)


def _png_with_pixels(path: Path, data: dict[str, object]) -> Path:
    """A1111's "save embedding as image" with its text chunk stripped: the zlib-compressed JSON,
    split into 4-bit halves, repeated to whole columns of height x 3 channels, decorated, XORed
    with the generator's stream, in strips left (low halves) and right (high halves) of the
    picture, each set off by one black column."""
    packed = np.frombuffer(zlib.compress(_a1111_json(data), level=9), np.uint8)
    picture = _picture()
    column = picture.height * 3
    size = -(-packed.size // column) * column + column
    first = next(iter(data["string_to_param"].values()))[0].abs()  # type: ignore[attr-defined]
    shades = (first / first.max() * 255).to(torch.uint8).numpy()
    strips = []
    for nibbles, order in ((packed & 0x0F, shades), (packed >> 4, shades[::-1])):
        block = np.resize(nibbles, size).reshape(picture.height, -1, 3)
        block = _decorated(block, order) ^ _lcg_stream(block.size).reshape(block.shape)
        strips.append(Image.fromarray(block, "RGB"))
    low, high = strips
    canvas = Image.new("RGB", (low.width + picture.width + high.width + 2, picture.height))
    canvas.paste(low, (0, 0))
    canvas.paste(picture, (low.width + 1, 0))
    canvas.paste(high, (low.width + picture.width + 2, 0))
    canvas.save(path, "PNG")
    return path


def test_the_generator_is_computed_as_a1111_defines_it() -> None:
    assert np.array_equal(lcg_nibbles(10_000), _lcg_stream(10_000))
    assert np.array_equal(lcg_nibbles(7), _lcg_stream(7))


@pytest.mark.parametrize(
    ("write", "width", "base"),
    [(_png_with_text, 768, "sd-1"), (_png_with_pixels, 1024, "sd-2")],
    ids=["text-chunk", "pixels"],
)
def test_a1111_png_embeddings_are_read_from_text_or_pixels(
    host_root: Path, tmp_path: Path, write, width: int, base: str
) -> None:
    vectors = _vectors(3, width)
    image = write(tmp_path / "painterly-1500.png", _a1111_data(vectors, "painterly"))
    if write is _png_with_pixels:
        assert "sd-ti-embedding" not in Image.open(image).info
    assert _import(host_root, image) == 0
    _only_records(host_root, ("painterly", base))
    embedding, _ = _host_reads(host_root, "painterly", base)
    assert torch.equal(embedding, vectors)
    metadata, facts = _stored(host_root, "painterly", base)
    assert (metadata["step"], metadata["sd_checkpoint_name"]) == ("1500", "v1-5-pruned-emaonly")
    assert facts["source_metadata"] == {
        "step": "1500",
        "sd_checkpoint": "e1441589a6",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }


def test_a1111_folder_skips_its_preview_images(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "a1111-embeddings"
    folder.mkdir()
    vectors = _vectors(2, 768)
    torch.save(_a1111_data(vectors, "painterly"), folder / "painterly.pt")
    _picture().save(folder / "painterly.preview.png")
    assert _import(host_root, folder) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "painterly.preview.png is a PNG image holding no A1111" in out
    _only_records(host_root, ("painterly", "sd-1"))
    assert torch.equal(_host_reads(host_root, "painterly", "sd-1")[0], vectors)


# -- 3. nn.ParameterDict pickles: the original repo and early A1111 ----------------------------


def _parameter_dict(vectors: torch.Tensor) -> torch.nn.ParameterDict:
    return torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})


@pytest.mark.parametrize("early_a1111", [False, True], ids=["original-repo", "early-a1111"])
def test_parameter_dict_pickles_are_read_without_unpickling_modules(
    host_root: Path, tmp_path: Path, early_a1111: bool
) -> None:
    vectors = _vectors(2, 768)
    saved: dict[str, object] = {  # the original repo's EmbeddingManager.save
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": _parameter_dict(vectors),
    }
    if early_a1111:
        saved.update({"name": "oldstyle", "step": 4000, "sd_checkpoint_name": "sd-v1-4"})
    torch.save(saved, tmp_path / "embeddings_gs-4000.pt")
    assert _import(host_root, tmp_path / "embeddings_gs-4000.pt") == 0
    name = "oldstyle" if early_a1111 else "embeddings_gs-4000"
    _only_records(host_root, (name, "sd-1"))
    assert torch.equal(_host_reads(host_root, name, "sd-1")[0], vectors)
    if early_a1111:
        assert _stored(host_root, name, "sd-1")[0]["step"] == "4000"


def test_files_the_host_cannot_load_itself_are_not_registered_in_place(host_root: Path) -> None:
    """Dropped into ROOT/embeddings/, a ParameterDict pickle or a safetensors file named .pt
    would be registered and then fail in the host's own loader (weights_only, reader chosen by
    the file name); start-up refuses them, and import brings them in."""
    from invokeai_ti_plugin.host.embedding_sync import sync_embeddings
    from invokeai_ti_plugin.host.model_db import open_host_models

    folder = host_root / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": _parameter_dict(_vectors(1, 768))}, folder / "pickled.pt")
    save_file({"emb_params": _vectors(1, 1024)}, str(folder / "misnamed.pt"))
    with open_host_models(host_root) as models:
        report = sync_embeddings(models)
    assert report.registered == [] and len(report.refused) == 2
    assert all("bring it in with `invokeai-ti import" in line for line in report.refused)
    _only_records(host_root)
    assert _import(host_root, folder / "pickled.pt", folder / "misnamed.pt") == 0
    _only_records(host_root, ("pickled", "sd-1"), ("misnamed", "sd-2"))
    assert torch.equal(_host_reads(host_root, "misnamed", "sd-2")[0], _vectors(1, 1024))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_a_parameter_dict_hiding_code_is_refused_and_nothing_runs(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    params = _parameter_dict(_vectors(1, 768))
    params.__dict__["payload"] = _RunsCode(marker)
    torch.save({"string_to_param": params}, tmp_path / "evil.pt")
    assert _import(host_root, tmp_path / "evil.pt") == 2
    assert "nothing in it was executed" in _one_error(capsys)
    assert not marker.exists()
    _only_records(host_root)


# -- 4. LoRAs with bundled embeddings ----------------------------------------------------------


def _lora(path: Path, bundles: dict[str, dict[str, torch.Tensor]], padding: int = 0) -> Path:
    """A kohya-style LoRA with pivotal-tuning embeddings under bundle_emb.<name>.*; `padding`
    adds that many float32 zeros to one LoRA weight (a big LoRA)."""
    block = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{block}.lora_down.weight": _vectors(4, 320),
        f"{block}.lora_up.weight": _vectors(320, 4),
        f"{block}.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, padding),
    }
    for name, layout in bundles.items():
        tensors.update({f"bundle_emb.{name}.{key}": value for key, value in layout.items()})
    metadata = {
        "ss_network_module": "networks.lora",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": "pivotal",
    }
    save_file(tensors, str(path), metadata)
    return path


def test_lora_bundles_are_extracted_and_the_lora_stays(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    sd1 = {"string_to_param.*": _vectors(2, 768, 1)}
    xl = {"clip_l": _vectors(3, 768, 2), "clip_g": _vectors(3, 1280, 3)}
    lora = _lora(tmp_path / "pivotal.safetensors", {"toy": sd1, "toyxl": xl}, padding=1_100_000)
    assert lora.stat().st_size > 16 * 2**20  # larger than any embedding we would load whole
    before = (lora.read_bytes(), lora.stat().st_mtime_ns)
    assert _import(host_root, lora) == 0
    assert (lora.read_bytes(), lora.stat().st_mtime_ns) == before
    _only_records(host_root, ("toy", "sd-1"), ("toyxl", "sdxl"))
    assert host_records(host_root, "lora") == []
    assert torch.equal(_host_reads(host_root, "toy", "sd-1")[0], sd1["string_to_param.*"])
    embedding, embedding_2 = _host_reads(host_root, "toyxl", "sdxl")
    assert torch.equal(embedding, xl["clip_g"]) and torch.equal(embedding_2, xl["clip_l"])
    metadata, facts = _stored(host_root, "toy", "sd-1")
    assert (metadata["modelspec.title"], metadata["bundled_in"]) == ("pivotal", lora.name)
    assert "ss_network_module" not in metadata  # about the LoRA's training, not the embedding
    assert "bundle_emb.toy" in str(facts["imported_from"])


def test_loras_without_bundles_or_with_oversized_ones_are_refused(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    plain = _lora(tmp_path / "plain.safetensors", {})
    assert _import(host_root, plain) == 2
    assert "is a LoRA without bundled embeddings" in _one_error(capsys)
    huge = _lora(tmp_path / "huge.safetensors", {"big": {"emb_params": torch.zeros(3000, 768)}})
    assert _import(host_root, huge) == 2
    assert "bundled embeddings take up to 18 MB" in _one_error(capsys)
    _only_records(host_root)


# -- 5. kohya's modelspec metadata -------------------------------------------------------------


def test_kohya_modelspec_metadata_is_kept(host_root: Path, tmp_path: Path) -> None:
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/textual-inversion",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "rusty",
        "modelspec.date": "2026-11-20T10:00:00",
        "modelspec.resolution": "1024x1024",
        "modelspec.thumbnail": "data:image/jpeg;base64," + "A" * 70_000,
    }
    tensors = {"clip_l": _vectors(2, 768), "clip_g": _vectors(2, 1280)}
    save_file(tensors, str(tmp_path / "rusty.safetensors"), spec)
    assert _import(host_root, tmp_path / "rusty.safetensors") == 0
    _only_records(host_root, ("rusty", "sdxl"))
    embedding, embedding_2 = _host_reads(host_root, "rusty", "sdxl")
    assert torch.equal(embedding, tensors["clip_g"]) and torch.equal(embedding_2, tensors["clip_l"])
    metadata, facts = _stored(host_root, "rusty", "sdxl")
    kept = {key: value for key, value in spec.items() if key != "modelspec.thumbnail"}
    assert {key: metadata[key] for key in kept} == kept
    assert facts["source_metadata"] == kept  # the thumbnail, an image, is left out


# -- 6. export for A1111 and ComfyUI -----------------------------------------------------------


def _a1111_loads(path: Path) -> tuple[str, int, int, dict[str, torch.Tensor] | torch.Tensor]:
    """A1111's documented reading of a .safetensors embedding: the name is the file's name; a
    file with clip_g and clip_l is SDXL (shape = the sum of both widths), else it must hold a
    single tensor (shape = its width). Returns name, shape, vectors and the vectors."""
    data = load_file(str(path))
    if "clip_g" in data and "clip_l" in data:
        shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
        return path.stem, shape, data["clip_g"].shape[0], data
    assert len(data) == 1, "A1111: embedding file has multiple terms in it"
    vec = next(iter(data.values()))
    vec = vec.unsqueeze(0) if vec.dim() == 1 else vec
    return path.stem, vec.shape[-1], vec.shape[0], vec


def _comfyui_loads(folder: Path, name: str, key: str, size: int) -> torch.Tensor | None:
    """ComfyUI's documented reading of `embedding:NAME` for one text encoder: the file
    NAME.safetensors; its tensor under the encoder's key (clip_l, clip_g, clip_h) if present,
    else its first one; used only if its width is the encoder's."""
    data = load_file(str(folder / f"{name}.safetensors"))
    embed = data[key] if key in data else next(iter(data.values()))
    return embed if embed.shape[-1] == size else None


def test_export_writes_name_safetensors_that_a1111_and_comfyui_load(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path
) -> None:
    sd1 = {"emb_params": _vectors(2, 768, 1)}
    sd2 = {"emb_params": _vectors(3, 1024, 2)}
    xl = {"clip_l": _vectors(4, 768, 3), "clip_g": _vectors(4, 1280, 4)}
    for tensors, name in ((sd1, "dual"), (xl, "dual"), (sd2, "wide")):
        save_file(tensors, str(tmp_path / "source.safetensors"))
        assert _import(host_root, tmp_path / "source.safetensors", extra=(f"--name={name}",)) == 0
    out = tmp_path / "a1111" / "embeddings"
    capsys.readouterr()

    assert main(["export", "dual", "--base=sd-3", f"--to={out}", f"--root={host_root}"]) == 2
    assert "--base: must be one of sd-1, sd-2, sdxl (got 'sd-3')" in _one_error(capsys)
    assert main(["export", "dual", f"--to={out}", f"--root={host_root}"]) == 2
    assert "<dual> for several bases (sd-1, sdxl); choose one with --base" in _one_error(capsys)
    assert not out.exists()
    assert main(["export", "dual", "--base=sdxl", f"--to={out}", f"--root={host_root}"]) == 0
    assert f"Exported <dual> (sdxl) to {out / 'dual.safetensors'}" in capsys.readouterr().out
    name, shape, count, data = _a1111_loads(out / "dual.safetensors")
    assert (name, shape, count) == ("dual", 768 + 1280, 4)
    assert isinstance(data, dict) and set(data) == {"clip_l", "clip_g"}
    assert all(torch.equal(data[key], xl[key]) for key in xl)
    for key, size in (("clip_l", 768), ("clip_g", 1280)):
        assert torch.equal(_comfyui_loads(out, "dual", key, size), xl[key])

    assert main(["export", "dual", "--base=sd-1", f"--to={out}", f"--root={host_root}"]) == 2
    assert "dual.safetensors exists already; pass --overwrite" in _one_error(capsys)
    for name, base, key, size, source in (
        ("dual", "sd-1", "clip_l", 768, sd1),
        ("wide", None, "clip_h", 1024, sd2),
    ):
        args = ["export", name, f"--to={out}", f"--root={host_root}", "--overwrite"]
        assert main([*args, f"--base={base}"] if base else args) == 0
        exported = out / f"{name}.safetensors"
        assert _a1111_loads(exported)[:3] == (name, size, source["emb_params"].shape[0])
        assert torch.equal(_a1111_loads(exported)[3], source["emb_params"])
        assert torch.equal(_comfyui_loads(out, name, key, size), source["emb_params"])
        assert set(load_file(str(exported))) == {"emb_params"}
    capsys.readouterr()
    assert sorted(path.name for path in out.iterdir()) == ["dual.safetensors", "wide.safetensors"]

    assert main(["export", "nothing", f"--to={out}", f"--root={host_root}"]) == 2
    assert "no embedding named <nothing> (it has: dual, wide)" in _one_error(capsys)


def test_an_exported_sd1_file_loads_with_diffusers(
    host_root: Path, tmp_path: Path, sd1_model: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    vectors = _vectors(3, 768)
    save_file({"emb_params": vectors}, str(tmp_path / "dotted.safetensors"))
    assert _import(host_root, tmp_path / "dotted.safetensors") == 0
    out = tmp_path / "export"
    assert main(["export", "dotted", f"--to={out}", f"--root={host_root}"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(sd1_model, safety_checker=None)
    pipe.load_textual_inversion(str(out / "dotted.safetensors"), token="<dotted>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<dotted>", "<dotted>_1", "<dotted>_2"])
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids].detach(), vectors)


# -- 7. what is not an embedding says so --------------------------------------------------------


def _text(path: Path) -> Path:
    path.write_text("hello world\nthis is a note\n")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _dir_of(path: Path, *files: tuple[str, bytes]) -> Path:
    path.mkdir()
    for name, content in files:
        (path / name).write_bytes(content)
    return path


def _jpeg(path: Path) -> Path:
    _picture().save(path, "JPEG")
    return path


def _plain_png(path: Path) -> Path:
    _picture().save(path, "PNG")
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: _text(tmp / "notes.txt"), "is a text file (starting 'hello world')"),
        (lambda tmp: _text(tmp / "fake.pt"), "fake.pt is a text file (starting 'hello world')"),
        (lambda tmp: tmp / "missing.pt", "missing.pt does not exist"),
        (lambda tmp: _empty(tmp / "empty.safetensors"), "empty.safetensors is empty, not an"),
        (lambda tmp: Path("/dev/zero"), "/dev/zero is not a regular file or folder"),
        (lambda tmp: _jpeg(tmp / "photo.jpg"), "photo.jpg is a JPEG image, not an embedding"),
        (lambda tmp: _plain_png(tmp / "photo.png"), "photo.png is a PNG image holding no A1111"),
        (lambda tmp: _dir_of(tmp / "void"), "void holds no embedding files (it is empty)"),
        (
            lambda tmp: _dir_of(tmp / "misc", ("a.txt", b"x"), ("b.json", b"{}")),
            "misc holds no embedding files (only a.txt, b.json)",
        ),
        (
            lambda tmp: _plain_png(_dir_of(tmp / "pics") / "cat.png").parent,
            "nothing to import: ",
        ),
    ],
    ids=[
        "text",
        "text-named-pt",
        "missing",
        "empty-file",
        "dev-zero",
        "jpeg",
        "plain-png",
        "empty-folder",
        "folder-of-others",
        "folder-of-pictures",
    ],
)
def test_what_is_not_an_embedding_is_named_with_what_is_accepted(
    capsys: pytest.CaptureFixture[str], host_root: Path, tmp_path: Path, make, expected: str
) -> None:
    assert _import(host_root, make(tmp_path)) == 2
    error = _one_error(capsys)
    assert expected in error
    if "does not exist" not in error:
        assert ACCEPTED in error or "holds no embedding files" in error
    _only_records(host_root)
    assert not (host_root / "embeddings").exists()
