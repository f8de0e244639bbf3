"""Training images: read anything a user might drop in a folder, as model-ready tensors.

Photos arrive as RGBA, palette, grayscale, 16-bit or EXIF-rotated files; each is turned into
plain 8-bit RGB the way a viewer shows it, so the model learns what the user saw.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import is_image_file
from ..errors import UserInputError

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True)
class TrainingImage:
    """One usable image: its file, its pixels at the training resolution, and its caption."""

    path: Path
    pixels: torch.Tensor  # [3, H, W], uint8: a quarter of float32's memory until encoded
    caption: str | None  # from name.txt beside name.png, if there is one
    original_size: tuple[int, int]  # (height, width) before scaling: SDXL conditions on it
    crop_top_left: tuple[int, int]  # where the square was cut from the original (SDXL)


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, in a stable order so runs are reproducible."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB; transparency is laid over white, 16-bit scaled to 8-bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def crop_box(size: tuple[int, int], center_crop: bool) -> tuple[int, int, int, int]:
    """The part of a (width, height) image that is scaled to the training square."""
    width, height = size
    if not center_crop:
        return (0, 0, width, height)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def to_training_square(image: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """Square at the training size: centre-cropped first, or stretched, as the user chose."""
    image = image.crop(crop_box(image.size, center_crop))
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


def read_caption(image_path: Path) -> str | None:
    """The words of name.txt beside name.png. A caption in another encoding is refused, not
    guessed at: training on garbled words, or silently without them, would teach the wrong
    thing, and the run stops here, before the model loads."""
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig")  # a BOM, as Notepad writes, is fine
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"caption {caption_path} is not UTF-8 text (byte {error.start} of it); save it as "
            "UTF-8, or delete it to train that image with the prompt templates",
            option="train_data_dir",
        ) from error
    return " ".join(text.split()) or None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8, as the file gave them: every image is held until the VAE has encoded
    it, so it stays small (SDXL: 3 MB an image instead of float32's 12 MB)."""
    array = np.array(image, dtype=np.uint8)  # a copy: Pillow's buffer is read-only
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_vae_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1], the range the VAE was trained on."""
    return pixels.float() / 127.5 - 1.0


def load_training_images(
    folder: Path, resolution: int, center_crop: bool, leave_out: Collection[Path] = ()
) -> list[TrainingImage]:
    """Every readable image of the folder but `leave_out` (files a run writes there itself);
    unreadable ones are skipped with a warning."""
    left_out = {path.resolve() for path in leave_out}
    images: list[TrainingImage] = []
    for path in image_files(folder):
        if path.resolve() in left_out:
            continue
        try:
            with Image.open(path) as opened:
                opened.load()
                rgb = to_rgb(opened)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            logger.warning("skipping %s: not a readable image (%s)", path.name, error)
            continue
        except Image.DecompressionBombError as error:
            logger.warning("skipping %s: too large to load (%s); scale it down", path.name, error)
            continue
        square = to_training_square(rgb, resolution, center_crop)
        left, top, _, _ = crop_box(rgb.size, center_crop)
        images.append(
            TrainingImage(
                path,
                to_tensor(square),
                read_caption(path),
                original_size=(rgb.height, rgb.width),
                crop_top_left=(top, left),
            )
        )
    if not images:
        raise UserInputError(
            f"none of the image files in {folder} could be read; add 3-20 PNG, JPEG or "
            "WebP pictures of your subject",
            option="train_data_dir",
        )
    return images
