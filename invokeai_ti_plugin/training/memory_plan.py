"""Turn on gradient checkpointing by itself when the GPU's free memory is short.

A step's activations dominate what training needs beyond the frozen weights, and they grow with
the batch and the image area. Their size per image was measured on an NVIDIA H200
(`benchmarks/gpu_check.sh`, 2026-11-26, half-precision weights): about 1.0 GiB for SD 1.x at
512 px and 5.3 GiB for SDXL at 1024 px; SD 2.x shares SD 1.x's UNet layout. Checkpointing cuts
them to a fraction at roughly 1.5-2x the time per step, so it is chosen only when they would
not fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GIB = 1024**3
# GiB of activations per megapixel of training image at half precision (measured, see above)
_ACTIVATIONS_PER_MEGAPIXEL_GIB = {"sd-1": 1.0 / 0.262, "sd-2": 1.0 / 0.262, "sdxl": 5.3 / 1.049}
_MARGIN = 1.2  # allocator fragmentation and the optimizer's and VAE's transient buffers
_WORKSPACE_GIB = 0.5  # cuDNN/cuBLAS workspaces and the CUDA context's own allocations


@dataclass(frozen=True)
class MemoryPlan:
    gradient_checkpointing: bool
    reason: str  # for the log: why it is on (empty when it is off)


def activation_estimate(base: str, resolution: int, batch_size: int, dtype: torch.dtype) -> float:
    """Bytes one step's activations need without checkpointing (measured, scaled by area)."""
    megapixels = resolution * resolution / 1e6
    per_image = _ACTIVATIONS_PER_MEGAPIXEL_GIB[base] * megapixels * GIB
    bytes_per_value = torch.finfo(dtype).bits / 8
    return per_image * batch_size * bytes_per_value / 2 * _MARGIN + _WORKSPACE_GIB * GIB


def plan_memory(
    requested: bool,
    free_bytes: int | None,
    base: str,
    resolution: int,
    batch_size: int,
    dtype: torch.dtype,
) -> MemoryPlan:
    """`free_bytes` is the GPU's free memory with the frozen model on it (None: not a GPU)."""
    if requested:
        return MemoryPlan(True, "--gradient_checkpointing was given")
    if free_bytes is None:
        return MemoryPlan(False, "")
    needed = activation_estimate(base, resolution, batch_size, dtype)
    if free_bytes >= needed:
        return MemoryPlan(False, "")
    return MemoryPlan(
        True,
        f"the GPU has {free_bytes / GIB:.1f} GiB free and a step needs about "
        f"{needed / GIB:.1f} GiB without it (slower steps, far less memory)",
    )


def free_gpu_bytes(device: torch.device) -> int | None:
    """What the allocator can still get on `device`: free memory plus what torch holds unused."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + reserved_unused


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's unused blocks back to the GPU. cuBLAS and cuDNN allocate outside
    torch's allocator (a handle per thread: the backward pass's own is created at the first
    step), so memory torch keeps cached but unused can make them fail on a card that fits."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
