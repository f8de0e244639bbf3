"""A1111's embeddings saved as PNG images, decoded as data: nothing in the file is executed.

A1111's "save embedding as image" writes the embedding dictionary (`string_to_param`, `name`,
`step`, `sd_checkpoint_name`, ...) as JSON in which each tensor is `{"TORCHTENSOR": nested
lists}`, twice: base64 in the PNG text chunk `sd-ti-embedding`, and zlib-compressed in the pixels.
There the compressed bytes are split into 4-bit halves, each half XORed with a fixed stream (the
low 4 bits of a linear congruential generator starting at seed 0, one value per channel) and laid
out row by row, 3 channels per pixel, in a strip left of the picture (the low halves) and one
right of it (the high halves), each strip set off by a black column. Sites that strip the text
chunk keep the pixels, so both are read: the text chunk first, as A1111 does.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UserInputError

TEXT_CHUNK = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
# A1111's own images are a preview of a few hundred pixels a side plus the data strips (under
# a million pixels for 75 vectors); anything far larger is refused before it is decoded
MAX_PIXELS = 2**25
_LCG_MULTIPLIER, _LCG_INCREMENT, _LCG_MODULUS = 1664525, 1013904223, 2**32


class NoEmbeddingInImage(Exception):
    """A readable PNG image that holds no A1111 embedding (a preview, a photo)."""


def read_image_embedding(path: Path, limit: int) -> dict[str, Any]:
    """The embedding dictionary of an A1111 PNG, its tensors float32; at most `limit` bytes of
    JSON are decoded."""
    found = _open(path)
    if isinstance(found, str):
        try:
            document = base64.b64decode(found)
        except ValueError as error:  # binascii.Error: broken padding
            raise UserInputError(
                f"{path}: its {TEXT_CHUNK!r} text is not base64 ({error})"
            ) from error
    else:
        document = _inflate(_pixel_payload(found), limit, path)
    if len(document) > limit:
        raise UserInputError(
            f"refused {path}: its embedding text holds {len(document) / 2**20:.0f} MB, far more "
            "than an embedding; it was not decoded"
        )
    try:
        data = json.loads(document, object_hook=_tensors)
    except (ValueError, TypeError, RecursionError, RuntimeError) as error:
        raise UserInputError(
            f"{path} holds A1111 embedding data that is damaged ({error})"
        ) from error
    if not isinstance(data, dict):
        raise UserInputError(f"{path} holds A1111 data that is not an embedding dictionary")
    return data


def lcg_nibbles(count: int) -> np.ndarray:
    """The low 4 bits of the first `count` values of A1111's generator (each value is the state
    modulo 255), computed a block at a time: s[k + B] = a^B s[k] + s[B] (mod 2^32)."""
    block = max(1, min(count, 4096))
    states = np.empty(count, dtype=np.uint64)
    state = 0
    for index in range(min(block, count)):
        state = (_LCG_MULTIPLIER * state + _LCG_INCREMENT) % _LCG_MODULUS
        states[index] = state
    jump = np.uint64(pow(_LCG_MULTIPLIER, block, _LCG_MODULUS))
    shift = np.uint64(state)  # s[B]: the state after B steps from 0
    for start in range(block, count, block):
        size = min(block, count - start)
        previous = states[start - block : start - block + size]
        states[start : start + size] = (previous * jump + shift) & np.uint64(_LCG_MODULUS - 1)
    return ((states % np.uint64(255)) & np.uint64(0x0F)).astype(np.uint8)


def _open(path: Path) -> str | np.ndarray:
    """The text chunk if there is one, else the pixels as RGB."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise UserInputError(
                    f"refused {path}: a {image.width}x{image.height} image is far larger than an "
                    "A1111 embedding image; it was not decoded"
                )
            text = getattr(image, "text", {}).get(TEXT_CHUNK)  # PNG text, also after the pixels
            return text if isinstance(text, str) else np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserInputError(f"{path} is not a readable PNG image ({error})") from error


def _pixel_payload(pixels: np.ndarray) -> bytes:
    """The compressed bytes hidden in the strips beside the picture."""
    lit = (pixels > 0).all(axis=2)
    rows, columns = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if not rows.size:
        raise NoEmbeddingInImage("it is black")
    low_bits = pixels[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1] & 0x0F
    blank = np.flatnonzero(low_bits.sum(axis=(0, 2)) == 0)
    if blank.size < 2:
        raise NoEmbeddingInImage("it has no data strips")
    low, high = low_bits[:, : blank[0]], low_bits[:, blank[-1] + 1 :]
    if low.shape != high.shape or not low.size:
        raise NoEmbeddingInImage("its strips do not match")
    stream = lcg_nibbles(low.size).reshape(low.shape)
    return (((high ^ stream) << 4) | (low ^ stream)).tobytes()


def _inflate(payload: bytes, limit: int, path: Path) -> bytes:
    """zlib-decompress at most `limit` + 1 bytes, so a bomb is caught before it is inflated."""
    inflater = zlib.decompressobj()
    try:
        document = inflater.decompress(payload, limit + 1)
    except zlib.error as error:
        raise NoEmbeddingInImage("its pixels hold no compressed data") from error
    if len(document) <= limit and not inflater.eof:
        raise NoEmbeddingInImage("its pixels hold no complete compressed data")
    if len(document) > limit:
        raise UserInputError(
            f"refused {path}: its pixels unpack to more than {limit / 2**20:.0f} MB, far more "
            "than an embedding; they were not decoded"
        )
    return document


def _tensors(document: dict[str, Any]) -> Any:
    """A1111's tensor encoding back to a float32 tensor; other objects as they are."""
    if TENSOR_KEY in document:
        return torch.tensor(document[TENSOR_KEY], dtype=torch.float32)
    return document
