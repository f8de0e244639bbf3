"""The evaluation loss, min-SNR weighting, Prodigy and the norm limit (issue 13), on the real
tiny pipelines."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from invokeai_ti_plugin.config import TrainingConfig, build_config
from invokeai_ti_plugin.errors import UserInputError
from invokeai_ti_plugin.training.checkpoints import load_checkpoint
from invokeai_ti_plugin.training.embedding_file import read_embedding_vectors
from invokeai_ti_plugin.training.loss_plot import write_loss_plot
from invokeai_ti_plugin.training.model_files import inspect_model, load_model_parts
from invokeai_ti_plugin.training.objective import denoising_loss, snr_weights
from invokeai_ti_plugin.training.optimizers import build_lr_scheduler
from invokeai_ti_plugin.training.reports import ProgressUpdate
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import embedding_vectors

MakeConfig = Callable[..., TrainingConfig]


def _history(config: TrainingConfig) -> list[dict[str, float]]:
    lines = (config.out_dir / "logs" / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _evaluation(config: TrainingConfig) -> dict[str, float | int | str | None]:
    return json.loads((config.out_dir / "embedding.json").read_text())["evaluation"]


# --- options -----------------------------------------------------------------------------------


def test_learning_rate_default_follows_the_optimizer(make_config: MakeConfig) -> None:
    assert make_config(learning_rate=None).learning_rate == 5e-4
    assert make_config(learning_rate=None, optimizer="prodigy").learning_rate == 1.0
    assert make_config(learning_rate=0.3, optimizer="prodigy").learning_rate == 0.3


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"snr_gamma": 0}, "--snr_gamma: must be a positive number"),
        ({"max_embedding_norm": -1}, "--max_embedding_norm: must be a positive number"),
        ({"optimizer": "sgd"}, "--optimizer: Input should be 'adamw' or 'prodigy'"),
        ({"save_best": True, "eval_loss": False}, "--save_best: needs the evaluation loss"),
    ],
)
def test_bad_options_are_named(
    make_config: MakeConfig, options: dict[str, object], expected: str
) -> None:
    good = make_config().model_dump()
    with pytest.raises(UserInputError) as error:
        build_config({**good, "learning_rate": None, **options})
    assert expected in str(error.value)


# --- min-SNR-gamma -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sd1_model", "sd2_model"])
def test_snr_weights_follow_the_formula(model: str, request: pytest.FixtureRequest) -> None:
    parts = load_model_parts(inspect_model(request.getfixturevalue(model)))
    scheduler = parts.noise_scheduler
    assert isinstance(scheduler, DDPMScheduler)
    timesteps = torch.tensor([0, 50, 200, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    if scheduler.config.prediction_type == "epsilon":  # sd-1
        expected = torch.minimum(snr, torch.tensor(gamma)) / snr
    else:  # sd-2 768-px: v-prediction
        assert scheduler.config.prediction_type == "v_prediction"
        expected = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)
    weights = snr_weights(scheduler, timesteps, gamma)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)
    assert weights[0] < weights[-1]  # the easy, low-noise step is weighed down

    # the weighted loss is the weighted mean of each example's own error
    generator = torch.Generator().manual_seed(3)
    dim = parts.info.token_dim
    latents, noise = (torch.randn(5, 4, 8, 8, generator=generator) for _ in range(2))
    hidden = torch.randn(5, 77, dim, generator=generator)
    with torch.no_grad():
        weighted = denoising_loss(
            parts.unet, scheduler, latents, hidden, noise, timesteps, snr_gamma=gamma
        )
        each = [
            denoising_loss(
                parts.unet, scheduler, latents[i : i + 1], hidden[i : i + 1], noise[i : i + 1],
                timesteps[i : i + 1],
            )
            for i in range(5)
        ]
    torch.testing.assert_close(weighted, (torch.stack(each) * weights).mean())


def test_snr_weight_of_a_zero_terminal_snr_step_is_finite() -> None:
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    weights = snr_weights(scheduler, torch.tensor([999, 998]), 5.0)
    assert weights[0] == 1.0 and torch.isfinite(weights).all()


# --- the evaluation loss ---------------------------------------------------------------------


@pytest.mark.slow
def test_evaluation_leaves_the_training_as_it_was(make_config: MakeConfig, tmp_path: Path) -> None:
    """Measuring it draws nothing from the training's random stream: the very same vectors."""
    measured = make_config(output_dir=tmp_path / "with", validation_steps=2, save_best=True)
    plain = make_config(output_dir=tmp_path / "without", eval_loss=False)
    with_eval = Trainer(measured).run()
    without = Trainer(plain).run()
    trained = [embedding_vectors(result.embedding_path) for result in (with_eval, without)]
    assert torch.equal(*trained)
    assert [r["loss"] for r in _history(measured)] == [r["loss"] for r in _history(plain)]

    history = _history(measured)
    assert [r["step"] for r in history] == [1, 2, 3, 4]  # still one line per update
    assert [r["step"] for r in history if "eval_loss" in r] == [2, 4]
    assert not any("eval_loss" in r for r in _history(plain))
    evaluation = _evaluation(measured)
    values = {r["step"]: r["eval_loss"] for r in history if "eval_loss" in r}
    values[0] = evaluation["start"]
    best_step = min(values, key=lambda step: values[step])
    assert evaluation["best_step"] == best_step and evaluation["best"] == values[best_step]
    assert evaluation["last_step"] == 4 and evaluation["last"] == values[4]
    assert evaluation["best_embedding"] == "learned_embeds-best.safetensors"
    best_file = read_embedding_vectors(measured.out_dir / "learned_embeds-best.safetensors")
    best, metadata = best_file.tensors["emb_params"], best_file.metadata
    assert metadata["steps"] == str(best_step) and float(metadata["eval_loss"]) == values[best_step]
    assert best.shape == (1, 768)
    assert _evaluation(plain)["start"] is None
    assert not (plain.out_dir / "learned_embeds-best.safetensors").exists()
    assert (measured.out_dir / "loss.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_resume_keeps_the_evaluation_record_and_the_optimizer_state(
    make_config: MakeConfig, tmp_path: Path, optimizer: str
) -> None:
    """Also Prodigy's state: saved with the checkpoint, loaded without running code
    (weights_only), and the resumed run ends on the very bits of the uninterrupted one."""
    options = dict(
        max_train_steps=6,
        checkpointing_steps=2,
        validation_steps=2,
        save_best=True,
        optimizer=optimizer,
        learning_rate=None if optimizer == "prodigy" else 1e-2,
    )
    whole = make_config(output_dir=tmp_path / "whole", **options)
    Trainer(whole).run()

    parted = make_config(output_dir=tmp_path / "parted", **options)
    trainer = Trainer(parted)

    def stop_at_three(update: ProgressUpdate) -> None:
        if update.step == 3:
            trainer.request_stop()

    trainer.on_progress = stop_at_three
    assert trainer.run().steps == 3
    state = torch.load(
        parted.out_dir / "checkpoints" / "checkpoint-3" / "optimizer.pt", weights_only=True
    )
    if optimizer == "prodigy":
        assert state["param_groups"][0]["d"] > 0  # Prodigy's own step-size estimate
    saved = load_checkpoint(parted.out_dir / "checkpoints" / "checkpoint-3")
    assert saved.snapshot.facts["evaluation"]["last_step"] == 2
    assert saved.snapshot.best_vectors is not None

    other = "adamw" if optimizer == "prodigy" else "prodigy"
    with pytest.raises(UserInputError, match=f"trained with --optimizer {optimizer}"):
        Trainer(
            parted.model_copy(update={"resume_from_checkpoint": "latest", "optimizer": other})
        ).run()

    Trainer(parted.model_copy(update={"resume_from_checkpoint": "latest"})).run()
    for name in ("learned_embeds.safetensors", "learned_embeds-best.safetensors"):
        expected = embedding_vectors(whole.out_dir / name)
        got = embedding_vectors(parted.out_dir / name)
        assert torch.equal(got, expected), name
    assert _evaluation(parted) == _evaluation(whole)
    assert _history(parted) == _history(whole)


def test_loss_plot_draws_the_evaluation_curve(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    lines = [{"step": s, "loss": 0.5, "lr": 1e-3} for s in range(1, 11)]
    lines[4]["eval_loss"] = 0.2
    lines[9]["eval_loss"] = 0.1
    history.write_text("".join(json.dumps(line) + "\n" for line in lines))
    green = np.array([44, 160, 44])  # matplotlib's tab:green

    def green_pixels(start_eval: float | None, with_eval: bool) -> int:
        if not with_eval:
            without = [{**line, "eval_loss": None} for line in lines]
            history.write_text("".join(json.dumps(line) + "\n" for line in without))
        plot = tmp_path / f"plot-{start_eval}-{with_eval}.png"
        write_loss_plot(history, plot, "t", start_eval)
        pixels = np.asarray(Image.open(plot).convert("RGB")).astype(int)
        return int((np.abs(pixels - green).sum(axis=-1) < 30).sum())

    assert green_pixels(0.3, True) > 200
    assert green_pixels(None, False) == 0


# --- Prodigy ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_prodigy_lowers_the_evaluation_loss(
    make_config: MakeConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the new vectors are parameters, so Prodigy's step size grows (with the whole token
    table it collapses: sd-scripts #980). Its print()ed remark stays off the terminal."""
    config = make_config(
        optimizer="prodigy",
        learning_rate=None,
        max_train_steps=30,
        validation_steps=0,
        checkpointing_steps=100,
    )
    Trainer(config).run()
    assert "decoupled weight decay" not in capsys.readouterr().out
    evaluation = _evaluation(config)
    assert evaluation["last"] < evaluation["start"] * 0.995, evaluation
    saved = config.out_dir / "checkpoints" / "checkpoint-30" / "optimizer.pt"
    state = torch.load(saved, weights_only=True)
    assert state["param_groups"][0]["d"] > 1e-4  # grew from its start, 1e-6


# --- the norm limit --------------------------------------------------------------------------


@pytest.mark.slow
def test_max_embedding_norm_bounds_every_vector(make_config: MakeConfig, tmp_path: Path) -> None:
    fast = dict(learning_rate=0.5, num_vectors=2, max_train_steps=3, eval_loss=False)
    free = Trainer(make_config(output_dir=tmp_path / "free", **fast)).run()
    limited_config = make_config(output_dir=tmp_path / "limited", max_embedding_norm=0.7, **fast)
    limited = Trainer(limited_config).run()
    free_norms = embedding_vectors(free.embedding_path).norm(dim=-1)
    limited_norms = embedding_vectors(limited.embedding_path).norm(dim=-1)
    assert (free_norms > 0.7).all(), free_norms
    assert (limited_norms <= 0.7 * (1 + 1e-6)).all(), limited_norms
    checkpoint = load_checkpoint(limited.checkpoint).snapshot.vectors["emb_params"]
    assert (checkpoint.norm(dim=-1) <= 0.7 * (1 + 1e-6)).all()


@pytest.mark.slow
def test_sdxl_logs_each_encoders_norms_and_the_limit_bounds_both(
    make_config: MakeConfig, sdxl_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = load_model_parts(inspect_model(sdxl_model))
    ball = [
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("ball</w>")]
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True)
    ]
    config = make_config(
        model=str(sdxl_model),
        output_dir=tmp_path / "sdxl",
        learning_rate=0.5,
        num_vectors=2,
        max_train_steps=3,
        eval_loss=False,
        max_embedding_norm=0.3,
    )
    with caplog.at_level(logging.INFO):
        result = Trainer(config).run()
    # the initializer's vector, twice, in each encoder: the numbers to choose a limit from
    expected = "; ".join(
        f"{key} {norm:.3f}, {norm:.3f}"
        for key, norm in zip(("clip_l", "clip_g"), (float(v.norm()) for v in ball), strict=True)
    )
    assert f"initial vector norms: {expected}" in caplog.messages
    assert all(float(v.norm()) > 0.3 for v in ball)  # so the limit had work to do in both
    for key, vectors in read_embedding_vectors(result.embedding_path).tensors.items():
        assert (vectors.norm(dim=-1) <= 0.3 * (1 + 1e-6)).all(), (key, vectors.norm(dim=-1))


@pytest.mark.parametrize(
    ("options", "warning", "rates"),
    [
        (  # the manual's form allows it; diffusers' constant schedule ignores the warm-up
            {"lr_warmup_steps": 100},
            "--lr_warmup_steps 100 has no effect with --lr_scheduler constant; choose "
            "constant_with_warmup (or another scheduler) for a warm-up",
            [1.0, 1.0, 1.0, 1.0],
        ),
        (
            {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 6},
            "--lr_warmup_steps 6 is not shorter than the run (--max_train_steps 4): the "
            "learning rate is still rising when it ends",
            [0.0, 1 / 6, 2 / 6, 3 / 6],
        ),
        ({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2}, None, [0, 0.5, 1, 1]),
    ],
)
def test_a_warmup_the_run_will_not_have_is_said_in_the_log(
    make_config: Callable[..., TrainingConfig],
    caplog: pytest.LogCaptureFixture,
    options: dict[str, object],
    warning: str | None,
    rates: list[float],
) -> None:
    vectors = torch.nn.Parameter(torch.zeros(1, 8))
    optimizer = torch.optim.AdamW([vectors], lr=1.0)
    with caplog.at_level(logging.WARNING, logger="invokeai_ti_plugin"):
        scheduler = build_lr_scheduler(make_config(**options), optimizer)
    assert [record.getMessage() for record in caplog.records] == ([warning] if warning else [])
    seen = []
    for _ in rates:
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(rates)
