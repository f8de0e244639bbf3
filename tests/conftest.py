"""Shared fixtures: tiny real pipelines, built once and cached on disk between sessions.

The cache key is a hash of the builder's source, so a change to the tiny architectures rebuilds
them. Set INVOKEAI_TI_TEST_CACHE to move the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

import invokeai_ti_plugin.tiny_models as tiny_models
from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.tiny_models import build_tiny_pipeline, make_demo_images


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
        }
        options.update(overrides)
        return TrainingConfig(**options)  # type: ignore[arg-type]

    return build


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Path:
    """A small image file of the given PIL mode."""
    color: object = {"RGB": (200, 30, 30), "RGBA": (0, 90, 200, 128), "L": 128}.get(mode, 1)
    Image.new(mode, size, color).save(path)  # type: ignore[arg-type]
    return path
