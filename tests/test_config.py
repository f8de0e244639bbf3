"""TrainingConfig: the manual's defaults, derived folders and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from invokeai_ti_plugin.config import TrainingConfig, build_config, xformers_installed
from invokeai_ti_plugin.host.app_config import find_root

from .conftest import write_image


@pytest.fixture
def root_with_data(tmp_path: Path) -> Path:
    data = tmp_path / "text-inversion-training-data" / "psychedelic"
    data.mkdir(parents=True)
    write_image(data / "a.png")
    return tmp_path


def test_defaults_follow_the_manual(root_with_data: Path) -> None:
    config = TrainingConfig(model="m", placeholder_token="<psychedelic>", root=root_with_data)
    assert config.learning_rate == 5e-4
    assert config.lr_scheduler == "constant"
    assert config.max_train_steps == 3000
    assert config.train_batch_size == (8 if xformers_installed() else 3)
    assert config.initializer_token == "*"
    assert config.learnable_property == "object"
    assert config.scale_lr is True
    assert config.resolution is None  # the model's native size
    assert config.only_save_embeds is True
    assert config.gradient_accumulation_steps == 1


def test_folders_default_to_the_trigger_under_the_root(root_with_data: Path) -> None:
    config = TrainingConfig(model="m", placeholder_token="<psychedelic>", root=root_with_data)
    assert config.trigger == "psychedelic"
    assert config.train_data_dir == root_with_data / "text-inversion-training-data" / "psychedelic"
    assert config.output_dir == root_with_data / "text-inversion-output" / "psychedelic"


def test_root_comes_from_invokeai_root(
    root_with_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the command line trains with when --root is not given: InvokeAI's rule."""
    monkeypatch.setenv("INVOKEAI_ROOT", str(root_with_data))
    config = build_config(
        {"model": "m", "placeholder_token": "<psychedelic>", "root": find_root()}
    )
    assert config.root == root_with_data


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("resolution", 500, "multiple of 8"),
        ("resolution", 0, "multiple of 8"),
        ("max_train_steps", 0, "positive"),
        ("train_batch_size", -1, "positive"),
        ("gradient_accumulation_steps", 0, "positive"),
        ("learning_rate", 0.0, "positive"),
        ("learning_rate", -1e-4, "positive"),
        ("lr_warmup_steps", -5, "zero or more"),
        ("placeholder_token", "two words", "one word"),
        ("initializer_token", " ", "single token"),
        ("lr_scheduler", "sometimes", "constant"),
    ],
)
def test_bad_values_are_refused_with_their_field(
    root_with_data: Path, field: str, value: object, message: str
) -> None:
    options: dict[str, object] = {"model": "m", "placeholder_token": "<psychedelic>"}
    options["root"] = root_with_data
    options[field] = value
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(**options)  # type: ignore[arg-type]
    errors = caught.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]
    assert message in errors[0]["msg"]


def test_missing_data_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(
            model="m", placeholder_token="<x>", root=tmp_path, train_data_dir=tmp_path / "nope"
        )
    (error,) = caught.value.errors()
    assert error["loc"] == ("train_data_dir",)
    assert "does not exist" in error["msg"]


def test_data_dir_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(model="m", placeholder_token="<x>", root=tmp_path, train_data_dir=tmp_path)
    (error,) = caught.value.errors()
    assert error["loc"] == ("train_data_dir",)
    assert "no PNG, JPEG or WebP images" in error["msg"]
