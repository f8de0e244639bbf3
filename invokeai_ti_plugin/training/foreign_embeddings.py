"""Other tools' containers, opened without running code; embedding_file turns them into vectors.

- Any file is recognised by its first bytes, so a misnamed file is read by what it is, and one
  that holds no embedding (text, a photo, an empty file) is named for what it is.
- torch.save archives and pickles are read with `weights_only=True`. The original
  textual-inversion repo and early A1111 pickled `string_to_param` as a `torch.nn.ParameterDict`;
  that one class name is mapped to an inert stand-in (see `load_pickled`).
- LoRAs with bundled embeddings (pivotal tuning) carry `bundle_emb.<name>.string_to_param.<key>`,
  `bundle_emb.<name>.emb_params`, or `bundle_emb.<name>.clip_l` + `.clip_g`, as A1111 reads them.
  A LoRA is large: only those keys are read, and only if their size is plausible.
- diffusers' SDXL example writes two files per embedding: learned_embeds.safetensors (first text
  encoder) and learned_embeds_2.safetensors (second), and `-steps-N` snapshots of both.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserInputError

BUNDLE_PREFIX = "bundle_emb."
ACCEPTED = (
    "accepted are embeddings in .safetensors, .pt, .bin or .ckpt files (InvokeAI, A1111, "
    "ComfyUI, kohya, diffusers, concepts library), A1111 .png embedding images, LoRAs with "
    "bundled embeddings, or a folder of them"
)
_PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"
_LORA_KEY = re.compile(r"lora|hada_|lokr_|oft_|\.alpha$", re.IGNORECASE)
_FORMATS = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"PK\x03\x04", "torch"),  # torch.save's zip archive
    (b"\x80", "torch"),  # a pickle: torch.save's legacy format, concepts-library .bin
)
_OTHER_FORMATS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a WebP image or other RIFF file"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
)


class NotAnEmbedding(UserInputError):
    """The file holds no embedding at all (text, a picture, a LoRA alone): a folder import skips
    it; named on its own, it is an error that says what is accepted."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}, not an embedding; {ACCEPTED}")
        self.what = what


class _PickledModule:
    """An inert stand-in for a pickled torch.nn.ParameterDict: `weights_only` unpickling puts its
    state (plain dicts of tensors) into `__dict__` as data; it has no code to run."""


def file_format(path: Path) -> str:
    """'safetensors', 'torch' or 'png', from the first bytes; anything else is refused, saying
    what it is."""
    try:
        with path.open("rb") as file:
            head = file.read(4096)
        size = path.stat().st_size
    except OSError as error:
        raise UserInputError(f"{path} cannot be read ({error.strerror or error})") from error
    for magic, kind in _FORMATS:
        if head.startswith(magic):
            return kind
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:  # header length, JSON
        return "safetensors"
    raise NotAnEmbedding(f"{path} is {_what_else(head)}")


def load_pickled(path: Path) -> tuple[dict[str, Any], bool]:
    """A torch.save archive or pickle, with `string_to_param` as a plain dict even where it was
    pickled as an nn.ParameterDict (then True, as InvokeAI cannot load such a file itself).
    Besides torch's own tensors and containers (what `weights_only` allows), the only class the
    file may name is that one, and it is rebuilt as `_PickledModule`, which runs nothing: a file
    naming any other class is refused unread."""
    try:
        with torch.serialization.safe_globals([(_PickledModule, _PARAMETER_DICT)]):
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserInputError(
            f"refused {path}: it holds Python objects other than tensors, which could run code "
            "when loaded; nothing in it was executed. Use a .safetensors embedding instead"
        ) from error
    except Exception as error:  # an untrusted file can break the reader in any way
        raise UserInputError(f"{path} is not a readable PyTorch file ({error})") from error
    if not isinstance(loaded, dict):
        raise UserInputError(f"{path} holds a {type(loaded).__name__}, not an embedding")
    params = loaded.get("string_to_param")
    if isinstance(params, _PickledModule):
        return {**loaded, "string_to_param": vars(params).get("_parameters")}, True
    return loaded, False


def refuse_lora(keys: list[str], path: Path) -> None:
    """Refuses a LoRA where one embedding is expected, saying what to do with it."""
    if any(key.startswith(BUNDLE_PREFIX) for key in keys):
        raise UserInputError(
            f"{path} is a LoRA with bundled embeddings; bring them in with "
            f"`invokeai-ti import {path}`"
        )
    if any(_LORA_KEY.search(key) for key in keys):
        raise NotAnEmbedding(f"{path} is a LoRA without bundled embeddings (add it as a LoRA)")


def bundled_layouts(path: Path, limit: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each bundled embedding's tensors in the layout of its own file (A1111's reading of the
    keys), and the LoRA's `modelspec.*` metadata; ({}, {}) for a file bundling none. At most
    `limit` bytes are loaded, counting 8 per value before anything is read."""
    if file_format(path) != "safetensors":
        return {}, {}
    layouts: dict[str, dict[str, Any]] = {}
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = [key for key in file.keys() if key.startswith(BUNDLE_PREFIX)]  # noqa: SIM118
            size = sum(8 * math.prod(file.get_slice(key).get_shape()) for key in keys)
            if size > limit:
                raise UserInputError(
                    f"refused {path}: its bundled embeddings take up to {size / 2**20:.0f} MB, "
                    "far more than embeddings; they were not loaded"
                )
            for key in keys:
                name, _, part = key.removeprefix(BUNDLE_PREFIX).partition(".")
                layout = layouts.setdefault(name, {})
                if part.startswith("string_to_param."):
                    layout.setdefault("string_to_param", {})[part.split(".", 1)[1]] = (
                        file.get_tensor(key)
                    )
                else:
                    layout[part] = file.get_tensor(key)
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise UserInputError(f"{path} is not a readable safetensors file ({error})") from error
    spec = {key: value for key, value in metadata.items() if key.startswith("modelspec.")}
    return layouts, spec


def sdxl_halves(path: Path) -> tuple[Path, Path] | None:
    """The pair of files `path` belongs to (first encoder's, second's), if the other is there:
    diffusers' learned_embeds[-steps-N] and learned_embeds_2[-steps-N], or NAME and NAME_2."""
    name, stem, suffix = path.name, path.stem, path.suffix
    if stem.startswith("learned_embeds_2"):
        pair = (path.with_name(name.replace("learned_embeds_2", "learned_embeds", 1)), path)
    elif stem.startswith("learned_embeds"):
        pair = (path, path.with_name(name.replace("learned_embeds", "learned_embeds_2", 1)))
    elif stem.endswith("_2"):
        pair = (path.with_name(stem.removesuffix("_2") + suffix), path)
    else:
        pair = (path, path.with_name(f"{stem}_2{suffix}"))
    return pair if all(half.is_file() for half in pair) else None


def _what_else(head: bytes) -> str:
    if not head:
        return "empty"
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            return what
    if b"\0" not in head:
        start = head.decode("utf-8", "replace").strip().split("\n")[0][:40]
        return f"a text file (starting {start!r})"
    return "a binary file of a format we do not know"
