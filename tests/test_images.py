"""Training images of every kind users drop in a folder load as plain RGB."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from invokeai_ti_plugin.errors import UserInputError
from invokeai_ti_plugin.training.images import load_training_images, to_rgb, to_vae_range

from .conftest import write_image


def test_every_mode_becomes_rgb_at_the_resolution(tmp_path: Path) -> None:
    write_image(tmp_path / "rgb.png", "RGB")
    write_image(tmp_path / "rgba.png", "RGBA")
    write_image(tmp_path / "gray.jpg", "L")
    Image.new("RGB", (50, 20), (10, 200, 10)).save(tmp_path / "photo.webp")
    palette = Image.new("P", (20, 20), 3)
    palette.info["transparency"] = 3
    palette.save(tmp_path / "palette.png", transparency=3)
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    images = load_training_images(tmp_path, resolution=32, center_crop=False)
    assert len(images) == 6
    for image in images:
        assert image.pixels.shape == (3, 32, 32)
        assert image.pixels.dtype == torch.uint8
        scaled = to_vae_range(image.pixels)
        assert scaled.dtype == torch.float32
        assert scaled.min() >= -1.0 and scaled.max() <= 1.0


def test_transparency_is_laid_over_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_brightness() -> None:
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as opened:
        assert to_rgb(opened).size == (20, 40)


def test_center_crop_keeps_the_middle(tmp_path: Path) -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white middle square
    image.save(tmp_path / "wide.png")
    (cropped,) = load_training_images(tmp_path, resolution=8, center_crop=True)
    assert cropped.pixels.min() > 240  # only the white square is left
    (stretched,) = load_training_images(tmp_path, resolution=8, center_crop=False)
    assert stretched.pixels.min() < 15


def test_unreadable_files_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with caplog.at_level(logging.WARNING):
        images = load_training_images(tmp_path, resolution=16, center_crop=False)
    assert [image.path.name for image in images] == ["good.png"]
    assert "broken.png" in caplog.text


def test_a_folder_of_only_unreadable_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"junk")
    (tmp_path / "broken.jpg").write_bytes(b"junk")
    with pytest.raises(UserInputError, match="none of the image files"):
        load_training_images(tmp_path, resolution=16, center_crop=False)
