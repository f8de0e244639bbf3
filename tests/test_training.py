"""Training on real tiny pipelines: it learns, only the new word changes, and resume is exact."""

from __future__ import annotations

import gc
import json
import logging
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.training.checkpoints import list_checkpoints
from invokeai_ti_plugin.training.embedding_file import read_embedding_vectors
from invokeai_ti_plugin.training.images import load_training_images, to_vae_range
from invokeai_ti_plugin.training.latent_cache import LatentCache
from invokeai_ti_plugin.training.model_files import (
    FolderModelSource,
    inspect_model,
    load_model_parts,
    load_vae,
)
from invokeai_ti_plugin.training.new_tokens import (
    add_placeholder_tokens,
    initializer_vectors,
)
from invokeai_ti_plugin.training.objective import denoising_loss
from invokeai_ti_plugin.training.reports import ProgressUpdate
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import (
    RecordingSource,
    assert_only_the_new_vectors_changed,
    embedding_vectors,
    fixed_eval_loss,
    generate,
)

MakeConfig = Callable[..., TrainingConfig]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_lowers_the_loss_on_the_training_images(
    make_config: MakeConfig, precision: str
) -> None:
    """Also with the frozen parts in 16-bit (bf16 runs on a CPU; fp16 is the same path on a GPU):
    the gradient reaches the fp32 vectors through the half-precision model."""
    config = make_config(
        max_train_steps=80, learning_rate=1e-1, checkpointing_steps=100, mixed_precision=precision
    )
    info = inspect_model(Path(config.model))
    parts = load_model_parts(info)
    ids = add_placeholder_tokens(parts.tokenizers[0], config.placeholder_token, 1)
    start = initializer_vectors(
        parts.tokenizers[0], parts.text_encoders[0], config.initializer_token, 1
    )
    assert len(ids) == 1
    result = Trainer(config).run()
    trained = embedding_vectors(result.embedding_path)
    before = fixed_eval_loss(config, {"emb_params": start})
    after = fixed_eval_loss(config, {"emb_params": trained})
    assert after < before * 0.99, (before, after)


def test_only_the_new_vectors_change(make_config: MakeConfig, sd1_model: Path) -> None:
    config = make_config(max_train_steps=3)
    source = RecordingSource(FolderModelSource(sd1_model))
    Trainer(config, None, source).run()
    assert source.parts is not None
    trained = source.parts
    original = load_model_parts(inspect_model(sd1_model))
    assert_only_the_new_vectors_changed(original, trained)
    table = trained.text_encoders[0].get_input_embeddings().weight
    assert table.shape == (49408, 768)  # the table did not grow

    vectors = embedding_vectors(config.out_dir / "learned_embeds.safetensors")
    start = initializer_vectors(original.tokenizers[0], original.text_encoders[0], "ball", 1)
    assert not torch.equal(vectors, start), "the new vector did not learn"


def test_outputs_describe_the_run(make_config: MakeConfig) -> None:
    config = make_config(max_train_steps=3, checkpointing_steps=2)
    result = Trainer(config).run()
    assert result.completed and result.steps == 3
    stored = read_embedding_vectors(result.embedding_path)
    vectors = stored.tensors["emb_params"]
    assert vectors.shape == (1, 768) and vectors.dtype == torch.float32
    assert stored.token == "<striped-ball>"
    assert stored.metadata["base"] == "sd-1"
    summary = json.loads(result.summary_path.read_text())
    assert summary["base"] == "sd-1"
    assert summary["token_dimension"] == 768
    assert summary["num_vectors"] == 1
    assert summary["steps"] == 3
    assert summary["trigger"] == "striped-ball"
    assert summary["seed"] == 1234
    assert summary["resolution"] == 64  # the tiny model's native size
    assert summary["options"]["learning_rate"] == config.learning_rate
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["checkpoint-2", "checkpoint-3"]
    history = (config.out_dir / "logs" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2, 3]
    assert "training <striped-ball>" in (config.out_dir / "logs" / "train.log").read_text()


def test_two_runs_in_one_process_keep_their_own_logs(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """A form or server trains many times in one process: each train.log holds its run alone,
    and the package's logging is left as it was found."""
    package_logger = logging.getLogger("invokeai_ti_plugin")
    handlers, level = list(package_logger.handlers), package_logger.level
    first = make_config(max_train_steps=1, output_dir=tmp_path / "first")
    second = make_config(
        max_train_steps=1, output_dir=tmp_path / "second", placeholder_token="<other-ball>"
    )
    Trainer(first).run()
    Trainer(second).run()
    first_log = (first.out_dir / "logs" / "train.log").read_text()
    second_log = (second.out_dir / "logs" / "train.log").read_text()
    assert "training <striped-ball>" in first_log and "<other-ball>" not in first_log
    assert "training <other-ball>" in second_log and "<striped-ball>" not in second_log
    assert package_logger.handlers == handlers and package_logger.level == level


def test_resume_ends_where_an_uninterrupted_run_ends(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    steps = 6
    whole = make_config(max_train_steps=steps, output_dir=tmp_path / "whole", checkpointing_steps=2)
    uninterrupted = Trainer(whole).run()

    parted = make_config(
        max_train_steps=steps, output_dir=tmp_path / "parted", checkpointing_steps=2
    )
    trainer = Trainer(parted)

    def stop_at_three(update: ProgressUpdate) -> None:
        if update.step == 3:
            trainer.request_stop()

    trainer.on_progress = stop_at_three
    stopped = trainer.run()
    assert not stopped.completed and stopped.steps == 3
    partial = embedding_vectors(stopped.embedding_path)

    resumed_config = parted.model_copy(update={"resume_from_checkpoint": "latest"})
    resumed = Trainer(resumed_config).run()
    assert resumed.completed and resumed.steps == steps

    expected = embedding_vectors(uninterrupted.embedding_path)
    got = embedding_vectors(resumed.embedding_path)
    assert not torch.allclose(partial, expected, atol=1e-6), "stopping early made no difference"
    assert torch.equal(got, expected)  # the very same bits, not merely close
    losses = [
        [
            json.loads(line)["loss"]
            for line in (run / "logs" / "history.jsonl").read_text().splitlines()
        ]
        for run in (tmp_path / "whole", tmp_path / "parted")
    ]
    assert len(losses[1]) == steps
    assert losses[1] == losses[0]


def test_v_prediction_model_trains_against_the_velocity(
    make_config: MakeConfig, sd2_model: Path
) -> None:
    info = inspect_model(sd2_model)
    assert (info.base, info.token_dim, info.prediction_type) == ("sd-2", 1024, "v_prediction")
    parts = load_model_parts(info)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    hidden = torch.randn(2, 77, 1024, generator=generator)
    with torch.no_grad():
        loss = denoising_loss(parts.unet, parts.noise_scheduler, latents, hidden, noise, timesteps)
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = parts.unet(noisy, timesteps, hidden).sample
    velocity = parts.noise_scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction, velocity))
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(prediction, noise))

    result = Trainer(make_config(model=str(sd2_model), max_train_steps=2)).run()
    stored = read_embedding_vectors(result.embedding_path)
    assert stored.tensors["emb_params"].shape == (1, 1024) and stored.metadata["base"] == "sd-2"


def test_diffusers_loads_the_embedding_and_the_word_means_something_new(
    make_config: MakeConfig, sd1_model: Path
) -> None:
    result = Trainer(make_config(max_train_steps=3)).run()
    pipeline = StableDiffusionPipeline.from_pretrained(str(sd1_model), safety_checker=None)
    pipeline.load_textual_inversion(str(result.embedding_path), token="<striped-ball>")
    trained = embedding_vectors(result.embedding_path)
    token_id = pipeline.tokenizer.convert_tokens_to_ids("<striped-ball>")
    table = pipeline.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[token_id], trained[0])

    def encode(prompt: str) -> torch.Tensor:
        ids = pipeline.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            return pipeline.text_encoder(ids.input_ids)[0]

    assert not torch.allclose(encode("a photo of a <striped-ball>"), encode("a photo of a ball"))
    learned = generate(pipeline, "a photo of a <striped-ball>")
    plain = generate(pipeline, "a photo of a ball")
    assert np.isfinite(learned).all()
    assert np.abs(learned - plain).max() > 0, "the new word does not reach the picture"


def test_cached_latents_give_the_loss_of_encoding_every_step(
    sd1_model: Path, object_images: Path
) -> None:
    info = inspect_model(sd1_model)
    parts = load_model_parts(info)
    vae = load_vae(info)
    images = load_training_images(object_images, 64, False)
    pixels = [image.pixels for image in images]
    # held as the files gave them until encoded: a quarter of float32's memory
    assert {p.dtype for p in pixels} == {torch.uint8}
    cache_vae = load_vae(info)
    vae_in_use = weakref.ref(cache_vae)
    cache = LatentCache(cache_vae, pixels, with_flips=True)
    del cache_vae
    gc.collect()
    assert vae_in_use() is None  # every variant is encoded up front: the VAE can go at once
    index = torch.tensor([2, 0])
    flipped = torch.tensor([True, False])
    cached = cache.sample(index, flipped, torch.Generator().manual_seed(5))

    batch = torch.stack([torch.flip(pixels[2], dims=[-1]), pixels[0]])
    with torch.no_grad():
        dist = vae.encode(to_vae_range(batch)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    direct = (dist.mean + dist.std * noise) * vae.config.scaling_factor

    generator = torch.Generator().manual_seed(8)
    noise = torch.randn(direct.shape, generator=generator)
    timesteps = torch.tensor([100, 700])
    hidden = torch.randn(2, 77, 768, generator=generator)
    with torch.no_grad():
        losses = [
            denoising_loss(parts.unet, parts.noise_scheduler, latents, hidden, noise, timesteps)
            for latents in (cached, direct)
        ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)

    unmirrored = LatentCache(load_vae(info), pixels, with_flips=False)
    with pytest.raises(ValueError, match="no mirrored images"):
        unmirrored.sample(index, flipped, torch.Generator())


def test_optimizer_state_holds_only_the_new_vectors(make_config: MakeConfig) -> None:
    config = make_config(max_train_steps=2, num_vectors=2)
    result = Trainer(config).run()
    state = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)
    assert [len(group["params"]) for group in state["param_groups"]] == [1]
    (moments,) = state["state"].values()
    assert moments["exp_avg"].shape == (2, 768)
    assert moments["exp_avg_sq"].shape == (2, 768)
