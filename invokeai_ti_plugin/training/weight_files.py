"""What a diffusers component folder's weight files say before they are loaded.

Hub downloads and InvokeAI's installer often keep only a model's fp16 files
(`unet/diffusion_pytorch_model.fp16.safetensors`), which diffusers and transformers load only
when told that variant. And a pipeline written back out should keep its files' precision, not
the float32 that `from_pretrained` loads by default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

_STEM = r"(?:diffusion_pytorch_model|model|pytorch_model)"
_WEIGHTS = re.compile(rf"{_STEM}(?:-\d+-of-\d+)?(?:\.(?P<variant>\w+))?\.(?:safetensors|bin)")
_INDEX = re.compile(rf"{_STEM}\.(?:safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json")
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _weight_files(component: Path) -> list[tuple[Path, str | None]]:
    """Each weight or shard-index file of the component, with its variant (None: plain)."""
    if not component.is_dir():
        return []
    found = []
    for path in sorted(component.iterdir()):
        match = _WEIGHTS.fullmatch(path.name) or _INDEX.fullmatch(path.name)
        if match:
            found.append((path, match["variant"]))
    return found


def _preferred(variants: set[str]) -> str | None:
    """fp16 where there is a choice (the variant hub repos and InvokeAI's installer use)."""
    return "fp16" if "fp16" in variants else min(variants, default=None)


def weights_variant(component: Path) -> str | None:
    """The variant to load the component with: None where plain files exist (or none at all),
    else its only variant (`_preferred` where there are several)."""
    variants = {variant for _, variant in _weight_files(component)}
    if None in variants:
        return None
    return _preferred({variant for variant in variants if variant is not None})


def stored_dtype(component: Path) -> torch.dtype:
    """The precision of the component's floating-point weights, from the header of the
    safetensors file `weights_variant` chooses; float32 where that cannot be read (pickles)."""
    variant = weights_variant(component)
    for path, file_variant in _weight_files(component):
        if file_variant != variant or path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    dtype = _SAFETENSORS_DTYPES.get(weights.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
        except (OSError, SafetensorError):
            break
    return torch.float32


def pipeline_load_options(folder: Path) -> dict[str, Any]:
    """`DiffusionPipeline.from_pretrained` keywords that load every component of the pipeline
    folder as it is stored: its variant (one for the pipeline) and each component's precision."""
    components = [path for path in sorted(folder.iterdir()) if path.is_dir()]
    variants = {variant for path in components if (variant := weights_variant(path))}
    return {
        "variant": _preferred(variants),
        "dtype": {path.name: stored_dtype(path) for path in components},
    }
