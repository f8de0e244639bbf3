"""SDXL, multi-vector words, captions, sample grids and the loss plot, on real tiny pipelines."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.training.embedding_file import read_embedding_vectors
from invokeai_ti_plugin.training.model_files import (
    FolderModelSource,
    inspect_model,
    load_model_parts,
)
from invokeai_ti_plugin.training.new_tokens import (
    initializer_vectors,
)
from invokeai_ti_plugin.training.prompts import training_prompts
from invokeai_ti_plugin.training.reports import ProgressUpdate
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import (
    DIMENSION_MISMATCH,
    RecordingSource,
    assert_only_the_new_vectors_changed,
    fixed_eval_loss,
    generate,
    host_cli_args,
    host_records,
)

MakeConfig = Callable[..., TrainingConfig]


@pytest.mark.slow
def test_sdxl_trains_both_encoders_and_only_their_new_rows(
    make_config: MakeConfig, sdxl_model: Path
) -> None:
    config = make_config(model=str(sdxl_model), max_train_steps=60, learning_rate=2e-2)
    info = inspect_model(sdxl_model)
    assert (info.base, info.token_dims, info.native_resolution) == ("sdxl", (768, 1280), 64)
    original = load_model_parts(info)
    starts = {
        key: initializer_vectors(tokenizer, encoder, "ball", 1)
        for key, tokenizer, encoder in zip(
            ("clip_l", "clip_g"), original.tokenizers, original.text_encoders, strict=True
        )
    }
    source = RecordingSource(FolderModelSource(sdxl_model))
    result = Trainer(config, None, source).run()
    stored = read_embedding_vectors(result.embedding_path)
    assert {key: tuple(t.shape) for key, t in stored.tensors.items()} == {
        "clip_l": (1, 768),
        "clip_g": (1, 1280),
    }
    for key in starts:
        assert not torch.equal(stored.tensors[key], starts[key]), f"{key} did not learn"

    assert source.parts is not None
    assert_only_the_new_vectors_changed(original, source.parts)

    before = fixed_eval_loss(config, starts)
    after_loss = fixed_eval_loss(config, stored.tensors)
    assert after_loss < before * 0.995, (before, after_loss)  # weak text path: tiny UNet


def test_sdxl_embedding_registers_as_sdxl_and_loads_in_diffusers(
    host_root: Path, object_images: Path, sdxl_model: Path
) -> None:
    assert main(host_cli_args(host_root, object_images, "tiny-sdxl", "--num_vectors=2")) == 0
    (record,) = host_records(host_root)
    assert (record.name, record.base.value) == ("striped-ball", "sdxl")
    vectors = read_embedding_vectors(Path(record.path)).tensors

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model))
    for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
        pipeline.load_textual_inversion(
            vectors[key],
            token="<striped-ball>",
            text_encoder=getattr(pipeline, f"text_encoder{suffix}"),
            tokenizer=getattr(pipeline, f"tokenizer{suffix}"),
        )
    token_id = pipeline.tokenizer_2.convert_tokens_to_ids("<striped-ball>_1")
    table = pipeline.text_encoder_2.get_input_embeddings().weight
    torch.testing.assert_close(table[token_id], vectors["clip_g"][1])
    learned = generate(pipeline, "a photo of a <striped-ball>")
    plain = generate(pipeline, "a photo of a ball")
    assert np.isfinite(learned).all()
    assert np.abs(learned - plain).max() > 0, "the new word does not reach the picture"


def test_the_dimension_check_covers_sdxl(
    capsys: pytest.CaptureFixture[str], host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    for model, name in (("tiny-sdxl", "xl"), ("tiny-sd-1", "one")):
        out = tmp_path / name
        args = host_cli_args(host_root, object_images, model, f"--output_dir={out}")
        assert main([*args, "--no-register_embedding"]) == 0
    capsys.readouterr()
    xl = tmp_path / "xl" / "learned_embeds.safetensors"
    one = tmp_path / "one" / "learned_embeds.safetensors"
    assert main(["import", str(xl), f"--root={host_root}", "--model=tiny-sd-1"]) == 2
    expected = DIMENSION_MISMATCH.format(name="striped-ball", got=1280, want=768)
    assert expected in capsys.readouterr().err
    assert main(["import", str(one), f"--root={host_root}", "--model=tiny-sdxl"]) == 2
    expected = DIMENSION_MISMATCH.format(name="striped-ball", got=768, want=1280)
    assert expected in capsys.readouterr().err
    assert host_records(host_root) == []


def test_initializer_phrases_seed_the_vectors(sd1_model: Path) -> None:
    parts = load_model_parts(inspect_model(sd1_model))
    tokenizer, encoder = parts.tokenizers[0], parts.text_encoders[0]
    table = encoder.get_input_embeddings().weight
    red, ball = (tokenizer("red ball", add_special_tokens=False).input_ids[i] for i in (0, 1))
    same = initializer_vectors(tokenizer, encoder, "red ball", 2)
    torch.testing.assert_close(same, table[[red, ball]])
    repeated = initializer_vectors(tokenizer, encoder, "red ball", 3)
    torch.testing.assert_close(repeated, table[[red, ball, red]])
    averaged = initializer_vectors(tokenizer, encoder, "red ball", 1)
    torch.testing.assert_close(averaged[0], table[[red, ball]].mean(dim=0))


def test_three_vectors_round_trip_through_the_host_and_diffusers(
    host_root: Path, object_images: Path, sd1_model: Path
) -> None:
    args = host_cli_args(host_root, object_images, "tiny-sd-1", "--num_vectors=3")
    assert main([*args, "--initializer_token=red striped ball"]) == 0
    (record,) = host_records(host_root)
    assert (record.name, record.base.value) == ("striped-ball", "sd-1")
    vectors = read_embedding_vectors(Path(record.path)).tensors["emb_params"]
    assert vectors.shape == (3, 768)

    pipeline = StableDiffusionPipeline.from_pretrained(str(sd1_model), safety_checker=None)
    pipeline.load_textual_inversion(record.path, token="<striped-ball>")
    expanded = pipeline.maybe_convert_prompt("a <striped-ball>", pipeline.tokenizer)
    assert expanded == "a <striped-ball> <striped-ball>_1 <striped-ball>_2"
    ids = pipeline.tokenizer(expanded, add_special_tokens=False).input_ids
    table = pipeline.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids[1:]], vectors)


def test_captions_are_the_prompts_of_their_images(
    make_config: MakeConfig, object_images: Path, tmp_path: Path
) -> None:
    data = tmp_path / "captioned"
    data.mkdir()
    for name in ("demo_00.png", "demo_01.png"):
        shutil.copy(object_images / name, data / name)
    (data / "demo_00.txt").write_text("a {} lying on the beach\n")
    config = make_config(train_data_dir=data, max_train_steps=8, train_batch_size=2)
    source = RecordingSource(FolderModelSource(Path(config.model)))
    trainer = Trainer(config, None, source)
    seen: list[list[int]] = []

    def watch_prompts(update: ProgressUpdate) -> None:
        if update.step == 1:
            assert source.parts is not None
            encoder = source.parts.text_encoders[0]
            encoder.register_forward_pre_hook(
                lambda module, args: seen.extend(args[0].tolist()) if args else None
            )

    trainer.on_progress = watch_prompts
    trainer.run()
    assert source.parts is not None
    tokenizer = source.parts.tokenizers[0]

    def ids_of(prompt: str) -> tuple[int, ...]:
        return tuple(tokenizer(prompt, padding="max_length", max_length=77).input_ids)

    caption = ids_of("a <striped-ball> lying on the beach")
    templates = {ids_of(prompt) for prompt in training_prompts("<striped-ball>", "object")}
    fed = {tuple(ids) for ids in seen}
    assert caption in fed
    assert fed - {caption} <= templates and len(fed) > 1  # the other image uses the templates


def test_sample_grids_and_loss_plot(make_config: MakeConfig) -> None:
    config = make_config(
        max_train_steps=4,
        validation_steps=2,
        num_validation_images=2,
        learning_rate=0.5,
        validation_prompt="a photo of a <striped-ball> on grass",
    )
    Trainer(config).run()
    samples = sorted((config.out_dir / "samples").glob("*.png"))
    assert [path.name for path in samples] == ["step-000002.png", "step-000004.png"]
    grids = [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in samples]
    assert grids[0].shape == (64, 128, 3)  # two 64-px samples side by side
    assert np.abs(grids[0] - grids[1]).sum() > 0, "what was learned does not show"
    with Image.open(config.out_dir / "loss.png") as plot:
        plot.verify()
    assert plot.format == "PNG"


@pytest.mark.parametrize("model_fixture", ["sd1_model", "sdxl_model"])
def test_sample_grids_with_the_frozen_model_in_half_precision(
    make_config: MakeConfig, request: pytest.FixtureRequest, model_fixture: str
) -> None:
    """The new vectors stay fp32 while the frozen model is 16-bit (bf16 here, on a CPU; fp16 on a
    GPU takes the same path), so the text encoder reports fp32: the pipeline must still be fed
    prompts in the UNet's precision and decode in the VAE's (SDXL's VAE stays fp32)."""
    model: Path = request.getfixturevalue(model_fixture)
    config = make_config(
        model=str(model),
        mixed_precision="bf16",
        max_train_steps=2,
        validation_steps=2,
        num_validation_images=2,
    )
    Trainer(config).run()
    (grid,) = (config.out_dir / "samples").glob("*.png")
    pixels = np.asarray(Image.open(grid).convert("RGB"), dtype=np.int16)
    height, width, _ = pixels.shape
    assert width == 2 * height  # both samples drawn
    assert pixels.std() > 0
