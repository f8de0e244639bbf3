"""A GPU that runs out of memory gets a one-line error saying what to change, not a traceback.

Out of memory shows up as torch's OutOfMemoryError, or as a RuntimeError from a CUDA library
that could not allocate outside torch's allocator (cuBLAS creating the backward pass's handle
fails as `CUBLAS_STATUS_ALLOC_FAILED`). Nothing of the failed step is saved: the run folder
keeps its last checkpoint, which the message points to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from diffusers import UNet2DConditionModel

from ..config import TrainingConfig
from ..errors import UserInputError
from .checkpoints import resume_hint
from .memory_plan import release_cached_memory

logger = logging.getLogger(__name__)

_SIGNS = ("out of memory", "_ALLOC_FAILED")  # CUDA's and MPS's wording; cuBLAS's and cuDNN's

T = TypeVar("T")


def is_out_of_memory(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(s in str(error) for s in _SIGNS)


def unless_out_of_memory(work: Callable[[], T], device: torch.device, skipped: str) -> T | None:
    """`work()`, or None and the warning `skipped` if the GPU runs out of memory during it: for
    what a run can go on without (a sample grid, an evaluation), which is not worth the run.
    torch's cache is handed back either way, so the training step has the memory again."""
    try:
        return work()
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        logger.warning(skipped)
        return None
    finally:
        release_cached_memory(device)


@contextmanager
def out_of_memory_explained(
    config: TrainingConfig,
    resolution: int,
    unet: UNet2DConditionModel,
    moment: Callable[[], str],  # where the run is: "before the first step", "at step 12"
) -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        # asked for, or turned on by the memory plan (which the UNet itself records)
        if config.gradient_checkpointing or unet.is_gradient_checkpointing:
            checkpointing, advice = "on", "lower --resolution or --train_batch_size"
        else:
            checkpointing = "off"
            advice = "add --gradient_checkpointing, or lower --resolution or --train_batch_size"
        raise UserInputError(
            f"the GPU ran out of memory {moment()} ({resolution} px, batch "
            f"{config.train_batch_size}, gradient checkpointing {checkpointing}): {advice}, or "
            f"close other programs that use the GPU{resume_hint(config.out_dir)}"
        ) from error  # of no single option: the line starts with what happened
