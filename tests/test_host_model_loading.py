"""Training through InvokeAI's own model manager: single-file checkpoints, shared parts given
back exactly as they were, the host's precision."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from invokeai_ti_plugin import tiny_single_file
from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.host.installed_models import find_installed_model
from invokeai_ti_plugin.host.model_db import open_host_models
from invokeai_ti_plugin.host.model_loading import host_model_source, standalone_model_loader
from invokeai_ti_plugin.tiny_single_file import (
    build_single_file_source,
    hub_repo_for,
    prepare_hub_configs,
    write_tiny_single_file,
)
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import (
    COMMAND,
    DIMENSION_MISMATCH,
    RecordingSource,
    _cache_dir,
    fails_cleanly,
    host_cli_args,
    host_records,
    save_tensors,
)

CHECKPOINT_NAME = "tiny-sd-1-file"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SD2_REPO = "stabilityai/stable-diffusion-2-1"


def _single_file_cache() -> Path:
    """Beside the tiny models, under the writer's own source hash: a changed writer rebuilds."""
    key = hashlib.sha256(Path(tiny_single_file.__file__).read_bytes()).hexdigest()[:12]
    return _cache_dir() / f"single-file-{key}"


@pytest.fixture(scope="session")
def sd1_single_file(sd1_model: Path) -> Path:
    """The tiny SD 1 pipeline as one original-layout .safetensors."""
    return write_tiny_single_file(sd1_model, _single_file_cache() / "sd-1.safetensors")


def _single_file(base: str, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """The diffusers folder of a tiny single-file checkpoint of `base`, and the file: SD 1's
    tiny pipeline as it is, SD 2's and SDXL's as `build_single_file_source` makes them."""
    if base == "sd-1":
        return request.getfixturevalue("sd1_model"), request.getfixturevalue("sd1_single_file")
    tiny = request.getfixturevalue({"sd-2": "sd2_model", "sdxl": "sdxl_model"}[base])
    source = build_single_file_source(tiny, _single_file_cache() / f"{base}-source")
    return source, write_tiny_single_file(source, _single_file_cache() / f"{base}.safetensors")


def add_checkpoint_record(
    root: Path, path: Path, name: str, base: str = "sd-1", **fields: object
) -> str:
    """Register a single-file main model the way the host stores one; its probe does not take
    a tiny model for a main model, so the record goes in through the record service."""
    from invokeai.backend.model_manager.configs.main import (
        Main_Checkpoint_SD1_Config,
        Main_Checkpoint_SD2_Config,
        Main_Checkpoint_SDXL_Config,
        Main_Checkpoint_SDXLRefiner_Config,
    )
    from invokeai.backend.model_manager.taxonomy import ModelSourceType

    kind = {
        "sd-1": Main_Checkpoint_SD1_Config,
        "sd-2": Main_Checkpoint_SD2_Config,
        "sdxl": Main_Checkpoint_SDXL_Config,
        "sdxl-refiner": Main_Checkpoint_SDXLRefiner_Config,
    }[base]
    record = kind(
        key=f"key-{name}",
        hash="blake3:tiny",
        path=str(path),
        file_size=path.stat().st_size,
        name=name,
        source=str(path),
        source_type=ModelSourceType.Path,
        prediction_type=fields.pop("prediction_type", "epsilon"),
        variant=fields.pop("variant", "normal"),
    )
    with open_host_models(root) as models:
        models.store.add_model(record)
    return record.key


@pytest.mark.parametrize(
    ("base", "repo"),
    [
        ("sd-1", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("sd-2", SD2_REPO),
        ("sdxl", SDXL_REPO),
    ],
)
def test_single_file_checkpoint_holds_the_pipelines_weights(
    base: str, repo: str, request: pytest.FixtureRequest
) -> None:
    """diffusers reads the written file back (in the original layout) as the very pipeline,
    and takes it for the model family whose configs the host's load asks the hub cache for."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder, checkpoint = _single_file(base, request)
    kind: Any = StableDiffusionXLPipeline if base == "sdxl" else StableDiffusionPipeline
    loaded = kind.from_single_file(str(checkpoint), config=str(folder))
    original = kind.from_pretrained(str(folder))
    weighted = [name for name, part in original.components.items() if hasattr(part, "state_dict")]
    assert len(weighted) == (4 if base == "sdxl" else 3)  # UNet, VAE, text encoder(s)
    for part in weighted:
        ours, theirs = getattr(loaded, part).state_dict(), getattr(original, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), part
    assert hub_repo_for(checkpoint) == repo


def test_list_models_shows_checkpoints_as_trainable(
    capsys: pytest.CaptureFixture[str], host_root: Path, sd1_single_file: Path, tmp_path: Path
) -> None:
    add_checkpoint_record(host_root, sd1_single_file, CHECKPOINT_NAME)
    others = [tmp_path / "inpaint.safetensors", tmp_path / "refiner.safetensors"]
    for other in others:
        other.write_bytes(b"listed, never loaded")
    add_checkpoint_record(host_root, others[0], "tiny-inpaint", variant="inpaint")
    add_checkpoint_record(host_root, others[1], "tiny-refiner", base="sdxl-refiner")
    assert main(["--list-models", f"--root={host_root}"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert str(sd1_single_file) in lines[CHECKPOINT_NAME], lines
    assert "not trainable: an inpaint model" in lines["tiny-inpaint"]
    assert "not trainable: an SDXL refiner" in lines["tiny-refiner"]
    assert "not trainable" not in lines["tiny-sd-1"]


def test_a_checkpoint_file_given_by_path_asks_to_install_it(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\0" * 16)
    args = [*host_cli_args(host_root, object_images, str(file)), f"--output_dir={out}"]
    fails_cleanly(capsys, args, "is a single-file checkpoint; add it in InvokeAI's", out)


def test_a_checkpoint_cannot_export_a_diffusers_pipeline(
    capsys: pytest.CaptureFixture[str],
    host_root: Path,
    object_images: Path,
    sd1_single_file: Path,
    tmp_path: Path,
) -> None:
    add_checkpoint_record(host_root, sd1_single_file, CHECKPOINT_NAME)
    out = tmp_path / "out"
    args = host_cli_args(
        host_root, object_images, CHECKPOINT_NAME, f"--output_dir={out}", "--no-only_save_embeds"
    )
    fails_cleanly(capsys, args, "--no-only_save_embeds saves a diffusers pipeline", out)


def test_an_import_is_checked_against_a_checkpoint_by_its_base(
    capsys: pytest.CaptureFixture[str], host_root: Path, sd1_single_file: Path, tmp_path: Path
) -> None:
    checkpoint_key = add_checkpoint_record(host_root, sd1_single_file, CHECKPOINT_NAME)
    refiner = tmp_path / "refiner.safetensors"
    refiner.write_bytes(b"listed, never loaded")
    add_checkpoint_record(host_root, refiner, "tiny-refiner", base="sdxl-refiner")
    one = save_tensors(tmp_path / "one.safetensors", {"emb_params": torch.randn(1, 768)})
    xl = save_tensors(
        tmp_path / "xl.safetensors",
        {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)},
    )
    root = f"--root={host_root}"

    assert main(["import", str(xl), root, f"--model={CHECKPOINT_NAME}"]) == 2
    err = capsys.readouterr().err
    assert DIMENSION_MISMATCH.format(name="xl", got=1280, want=768) in err
    assert main(["import", str(one), root, "--model=tiny-refiner"]) == 2
    assert "--model: tiny-refiner cannot be trained: an SDXL refiner" in capsys.readouterr().err
    assert host_records(host_root) == []

    assert main(["import", str(one), root, f"--model={CHECKPOINT_NAME}"]) == 0
    assert "InvokeAI: registered <one> (sd-1)" in capsys.readouterr().out
    (record,) = host_records(host_root)
    assert record.name == "one"
    with open_host_models(host_root) as models:  # the model it was imported for is related
        assert models.relationships.get_related_model_keys(record.key) == [checkpoint_key]


def _encode(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


@pytest.mark.slow
def test_training_through_the_hosts_cache_gives_every_part_back_as_it_was(
    host_root: Path,
    make_config,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run trains on the cache's own UNet and text encoder (no second copy), and afterwards
    the cache hands out the same objects, unchanged: same weights, outputs, vocabulary, flags."""
    from invokeai.backend.model_manager.taxonomy import SubModelType

    config: TrainingConfig = make_config(
        model="tiny-sd-1", root=host_root, mixed_precision="bf16", gradient_checkpointing=True
    )
    with open_host_models(host_root) as models:
        (model,) = find_installed_model(models, "tiny-sd-1")
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    with standalone_model_loader(host_root) as loader_for:
        load = loader_for(model.record)
        encoder = load(SubModelType.TextEncoder).model
        unet = load(SubModelType.UNet).model
        tokenizer = load(SubModelType.Tokenizer).model
        table, vocabulary = encoder.get_input_embeddings(), len(tokenizer)
        weights, before = table.weight.clone(), _encode(encoder, ids)
        eos, unet_flags = encoder.config.eos_token_id, [p.requires_grad for p in unet.parameters()]
        processors = dict(unet.attn_processors)

        source = RecordingSource(host_model_source(model.record, load))
        with caplog.at_level(logging.WARNING):
            result = Trainer(config, None, source).run()

        assert result.completed and result.embedding_path.is_file()
        parts = source.parts
        assert parts is not None
        assert parts.unet is unet  # shared with the cache, never copied
        assert parts.text_encoders[0] is encoder
        assert parts.tokenizers[0] is not tokenizer  # the run's own copy
        assert parts.dtype == torch.float32  # the host's precision on a CPU
        assert "InvokeAI loads tiny-sd-1 in float32" in caplog.text

        assert load(SubModelType.TextEncoder).model is encoder
        assert load(SubModelType.UNet).model is unet
        assert load(SubModelType.Tokenizer).model is tokenizer
        assert encoder.get_input_embeddings() is table and torch.equal(table.weight, weights)
        assert len(tokenizer) == vocabulary and "<striped-ball>" not in tokenizer.get_vocab()
        assert torch.equal(_encode(encoder, ids), before)
        assert encoder.config.eos_token_id == eos and not encoder.training
        assert [p.requires_grad for p in unet.parameters()] == unet_flags
        assert not unet.is_gradient_checkpointing and dict(unet.attn_processors) == processors
        assert "forward" not in vars(encoder) and "forward" not in vars(unet)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("base", "prediction", "shapes", "extra"),
    [
        ("sd-1", "epsilon", {"emb_params": (1, 768)}, []),
        # SD 2.1-base: InvokeAI's probe records epsilon, diffusers loads SD 2.1's v-prediction
        ("sd-2", "epsilon", {"emb_params": (1, 1024)}, []),
        # SDXL as most users install it, its second encoder in OpenCLIP's layout; a
        # v-prediction finetune, which InvokeAI records as v_prediction once the user says so
        ("sdxl", "v_prediction", {"clip_l": (1, 768), "clip_g": (1, 1280)}, ["--no-eval_loss"]),
    ],
)
def test_the_command_line_trains_a_single_file_checkpoint(
    base: str,
    prediction: str,
    shapes: dict[str, tuple[int, int]],
    extra: list[str],
    host_root: Path,
    object_images: Path,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """Through the host's own single-file loader, offline: diffusers reads the family's configs
    from the hub cache, where a first online load would have left them. The run predicts what
    InvokeAI's record says the model predicts, as InvokeAI's generation does, even where the
    family's scheduler config says otherwise."""
    from invokeai_ti_plugin.training.embedding_file import read_embedding_vectors

    folder, checkpoint = _single_file(base, request)
    name = f"tiny-{base}-file"
    add_checkpoint_record(host_root, checkpoint, name, base=base, prediction_type=prediction)
    hub = tmp_path / "hub"
    prepare_hub_configs(hub, hub_repo_for(checkpoint), folder)
    configured = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    args = host_cli_args(host_root, object_images, name, "--resolution=64", *extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    done = subprocess.run([COMMAND, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    (embedding,) = host_records(host_root)
    assert (embedding.name, embedding.base.value) == ("striped-ball", base)
    stored = host_root / "embeddings" / "striped-ball" / base / "learned_embeds.safetensors"
    vectors = read_embedding_vectors(stored).tensors
    assert {key: tuple(tensor.shape) for key, tensor in vectors.items()} == shapes
    summary = host_root / "text-inversion-output" / "striped-ball" / "embedding.json"
    facts = json.loads(summary.read_text())
    assert (facts["model"], facts["prediction_type"]) == (name, prediction)
    differs = configured["prediction_type"] != prediction
    assert differs == (base != "sd-1")  # the cases above: the record and config disagree
    assert differs == (f"{name} predicts {prediction} by InvokeAI's model record" in done.stderr)


@pytest.mark.slow
def test_sdxl_parts_come_from_the_hosts_cache(host_root: Path) -> None:
    """Both SDXL tokenizers and text encoders, in the host's order and precision; the VAE is
    the cache's own where the host loads it in float32 (on a CPU)."""
    from invokeai.backend.model_manager.taxonomy import SubModelType

    with open_host_models(host_root) as models:
        (model,) = find_installed_model(models, "tiny-sdxl")
    with standalone_model_loader(host_root) as loader_for:
        load = loader_for(model.record)
        unet = load(SubModelType.UNet).model
        flags = [p.requires_grad for p in unet.parameters()]
        assert all(flags)  # as from_pretrained leaves them: training must clear, then restore
        source = host_model_source(model.record, load)
        assert (source.info.base, source.info.token_dims) == ("sdxl", (768, 1280))
        assert source.dtype == torch.float32
        parts = source.load_parts(torch.float32)
        vae = source.load_vae(torch.float32)
        kinds = (SubModelType.TextEncoder, SubModelType.TextEncoder2)
        assert [id(e) for e in parts.text_encoders] == [id(load(kind).model) for kind in kinds]
        assert [e.config.hidden_size for e in parts.text_encoders] == [768, 1280]
        assert len(parts.tokenizers) == 2 and vae is load(SubModelType.VAE).model
        assert parts.unet is unet and not any(p.requires_grad for p in unet.parameters())
        source.close()
        assert [p.requires_grad for p in unet.parameters()] == flags


def test_a_corrected_prediction_type_in_the_model_manager_is_what_training_predicts(
    host_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A diffusers model whose scheduler config is wrong, corrected in InvokeAI's model
    manager: InvokeAI generates with the record's prediction type, so training must too (the
    noise schedule the loss, evaluation and sample grids all use)."""
    from invokeai.app.services.model_records import ModelRecordChanges
    from invokeai.backend.model_manager.taxonomy import SchedulerPredictionType

    with open_host_models(host_root) as models:
        (model,) = find_installed_model(models, "tiny-sd-1")
        record = models.store.update_model(
            model.record.key,
            ModelRecordChanges(prediction_type=SchedulerPredictionType.VPrediction),
        )
    with standalone_model_loader(host_root) as loader_for:
        source = host_model_source(record, loader_for(record))
        with caplog.at_level(logging.WARNING):
            parts = source.load_parts(source.dtype or torch.float32)
        source.close()
    assert parts.info.prediction_type == "v_prediction"
    assert parts.noise_scheduler.config.prediction_type == "v_prediction"
    assert "its scheduler config says epsilon" in caplog.text
