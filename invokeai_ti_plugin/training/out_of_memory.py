"""A GPU that runs out of memory gets a one-line error saying what to change, not a traceback.

Out of memory shows up as torch's OutOfMemoryError, or as a RuntimeError from a CUDA library
that could not allocate outside torch's allocator (cuBLAS creating the backward pass's handle
fails as `CUBLAS_STATUS_ALLOC_FAILED`). Nothing of the failed step is saved: the run folder
keeps its last checkpoint, which the message points to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel

from ..config import TrainingConfig
from ..errors import UserInputError
from .checkpoints import resume_hint

_SIGNS = ("out of memory", "_ALLOC_FAILED")  # CUDA's and MPS's wording; cuBLAS's and cuDNN's


def is_out_of_memory(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(s in str(error) for s in _SIGNS)


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
