"""Shared fixtures: tiny real pipelines, built once and cached on disk between sessions.

The cache key is a hash of the builder's source, so a change to the tiny architectures rebuilds
them. Set INVOKEAI_TI_TEST_CACHE to move the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import invokeai_ti_plugin.tiny_models as tiny_models
from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.tiny_models import build_tiny_pipeline, make_demo_images
from invokeai_ti_plugin.training.images import load_training_images
from invokeai_ti_plugin.training.latent_cache import LatentCache
from invokeai_ti_plugin.training.model_files import inspect_model, load_model_parts, load_vae
from invokeai_ti_plugin.training.new_tokens import (
    add_placeholder_tokens,
    install_placeholder_embedding,
)
from invokeai_ti_plugin.training.objective import denoising_loss
from invokeai_ti_plugin.training.prompts import training_prompts
from invokeai_ti_plugin.training.text_conditioning import TextConditioning, sdxl_time_ids


def _cache_dir() -> Path:
    source = Path(tiny_models.__file__).read_bytes()
    key = hashlib.sha256(source).hexdigest()[:12]
    default = Path.home() / ".cache" / "invokeai-ti-plugin" / "test-models"
    return Path(os.environ.get("INVOKEAI_TI_TEST_CACHE", default)) / key


@pytest.fixture(scope="session")
def sd1_model() -> Path:
    return build_tiny_pipeline(_cache_dir() / "sd-1", "sd-1")


@pytest.fixture(scope="session")
def sd2_model() -> Path:
    return build_tiny_pipeline(_cache_dir() / "sd-2", "sd-2")


@pytest.fixture(scope="session")
def sdxl_model() -> Path:
    return build_tiny_pipeline(_cache_dir() / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def object_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("object-images")
    make_demo_images(folder, count=4)
    return folder


@pytest.fixture
def make_config(sd1_model: Path, object_images: Path, tmp_path: Path):
    """A small, fast, seeded training config; keyword arguments override its fields."""

    def build(**overrides: object) -> TrainingConfig:
        options: dict[str, object] = {
            "model": str(sd1_model),
            "placeholder_token": "<striped-ball>",
            "initializer_token": "ball",
            "train_data_dir": object_images,
            "output_dir": tmp_path / "out",
            "root": tmp_path / "root",
            "max_train_steps": 4,
            "train_batch_size": 2,
            "learning_rate": 1e-2,
            "scale_lr": False,
            "mixed_precision": "no",
            "enable_xformers_memory_efficient_attention": False,
            "seed": 1234,
            "num_validation_images": 0,
        }
        options.update(overrides)
        return TrainingConfig(**options)  # type: ignore[arg-type]

    return build


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Path:
    """A small image file of the given PIL mode."""
    color: object = {"RGB": (200, 30, 30), "RGBA": (0, 90, 200, 128), "L": 128}.get(mode, 1)
    Image.new(mode, size, color).save(path)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="session")
def host_root_template(
    tmp_path_factory: pytest.TempPathFactory, sd1_model: Path, sd2_model: Path, sdxl_model: Path
) -> Path:
    """An InvokeAI root made by the host's own migrations, with the tiny models installed."""
    from invokeai_ti_plugin.host.installed_models import install_main_model
    from invokeai_ti_plugin.host.model_db import open_host_models

    root = tmp_path_factory.mktemp("host-root-template")
    with open_host_models(root) as models:
        install_main_model(models, sd1_model.resolve(), "tiny-sd-1")
        install_main_model(models, sd2_model.resolve(), "tiny-sd-2")
        install_main_model(models, sdxl_model.resolve(), "tiny-sdxl")
        # a model whose files were deleted after it was installed: listed, not trainable
        moved = root / "moved-away"
        shutil.copytree(sd1_model, moved)
        install_main_model(models, moved, "moved-away")
        shutil.rmtree(moved)
    return root


@pytest.fixture
def host_root(host_root_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template root for one test."""
    root = tmp_path / "invokeai"
    shutil.copytree(host_root_template, root)
    return root


def host_records(root: Path, model_type: str = "embedding") -> list:  # type: ignore[type-arg]
    """The host's model records of one type, read through its own record service."""
    from invokeai.backend.model_manager.taxonomy import ModelType

    from invokeai_ti_plugin.host.model_db import open_host_models

    with open_host_models(root) as models:
        return list(models.store.search_by_attr(model_type=ModelType(model_type)))


def fixed_eval_loss(config: TrainingConfig, vectors: dict[str, torch.Tensor]) -> float:
    """Mean loss over every image and prompt with fixed noise and timesteps."""
    info = inspect_model(Path(config.model))
    parts = load_model_parts(info)
    for tokenizer, encoder, start in zip(
        parts.tokenizers, parts.text_encoders, vectors.values(), strict=True
    ):
        ids = add_placeholder_tokens(tokenizer, config.placeholder_token, len(start))
        install_placeholder_embedding(encoder, ids, start)
    images = load_training_images(config.data_dir, info.native_resolution, False)
    cache = LatentCache(load_vae(info), torch.stack([i.pixels for i in images]), False)
    prompts = training_prompts(config.placeholder_token, config.learnable_property)
    conditioning = TextConditioning(parts.tokenizers, parts.text_encoders, prompts, "cpu")
    time_ids = sdxl_time_ids(images, info.native_resolution)
    generator = torch.Generator().manual_seed(99)
    losses = []
    with torch.no_grad():
        for repeat in range(6):
            index = torch.arange(len(images))
            latents = cache.sample(index, torch.zeros_like(index, dtype=torch.bool), generator)
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (len(images),), generator=generator)
            hidden, added = conditioning.encode((index + repeat) % len(prompts), time_ids)
            losses.append(
                denoising_loss(
                    parts.unet, parts.noise_scheduler, latents, hidden, noise, timesteps, added
                )
            )
    return float(torch.stack(losses).mean())


COMMAND = str(Path(sys.executable).parent / "invokeai-ti")


def cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`invokeai-ti` options for a tiny, quick run teaching <striped-ball>."""
    return [
        f"--model={model}",
        "--placeholder_token=<striped-ball>",
        "--initializer_token=ball",
        f"--train_data_dir={data}",
        f"--output_dir={out}",
        "--max_train_steps=2",
        "--train_batch_size=2",
        "--mixed_precision=no",
        "--no-enable_xformers_memory_efficient_attention",
        "--num_validation_images=0",
        *extra,
    ]


def start_training(args: list[str], out: Path) -> subprocess.Popen[str]:
    """`invokeai-ti ARGS` in a subprocess, returned once it has made two updates (so it holds
    its output folder and has something to save)."""
    process = subprocess.Popen(
        [COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    history = out / "logs" / "history.jsonl"
    deadline = time.monotonic() + 180
    while not (history.is_file() and history.read_text().count("\n") >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    return process


def one_error_line(stderr: str, expected: str) -> str:
    """A failed command's stderr holds no traceback and one error line, the last, of the form
    `invokeai-ti: error: ...` and holding `expected`; returns that line."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert errors[0].startswith("invokeai-ti: error: "), errors[0]
    assert expected in errors[0], errors[0]
    return errors[0]


def fails_cleanly(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str, out: Path
) -> None:
    """`invokeai-ti ARGS` stops with status 2 and one error line, having written nothing."""
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not out.exists() or not any(out.iterdir()), "a failed start wrote files"
