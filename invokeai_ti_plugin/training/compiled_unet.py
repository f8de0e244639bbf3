"""--torch_compile: the training step's UNet through torch.compile.

At batch 1 a GPU spends much of a step waiting for Python to launch the UNet's many small
kernels; a compiled UNet launches fewer, fused ones, and 'reduce-overhead' replays them as CUDA
graphs. Compiling costs time at the first step, so it is the user's choice, measured by
`benchmarks/gpu_check.sh`. Only the training step uses it: evaluation and sample grids call the
UNet with other shapes and without gradients, which would each compile again.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.exc import TorchDynamoException

from ..config import TorchCompile
from ..errors import UserInputError

logger = logging.getLogger(__name__)


def unet_for_training(unet: UNet2DConditionModel, mode: TorchCompile) -> UNet2DConditionModel:
    """The UNet the training step calls: `unet` itself, or a compiled wrapper around it that
    leaves the module (which InvokeAI's model cache may share) untouched."""
    if mode == "off":
        return unet
    logger.info("compiling the UNet (--torch_compile %s): the first steps take longer", mode)
    compiled: UNet2DConditionModel = torch.compile(unet, mode=mode)  # type: ignore[assignment]
    return compiled


@contextmanager
def compiled_training(mode: TorchCompile) -> Iterator[None]:
    """Around the loop: a compiler that fails on this machine (no triton, no C++ compiler) is a
    one-line error, and the compiled graphs and CUDA-graph memory go with the run, so a server
    process that trains again holds nothing of this run's."""
    if mode == "off":
        yield
        return
    try:
        with warnings.catch_warnings():
            # diffusers' gradient checkpointing asks an lru_cache'd version check, which dynamo
            # traces through and warns about: harmless, and not the user's to act on
            warnings.filterwarnings(
                "ignore", "Dynamo detected a call to a `functools.lru_cache`", UserWarning
            )
            yield
    except TorchDynamoException as error:
        cause = next(
            (line for line in str(error).splitlines() if line.strip()), type(error).__name__
        )
        raise UserInputError(
            f"torch.compile failed on this machine ({cause.strip()}); train without "
            "--torch_compile, or install what it names",
            option="torch_compile",
        ) from error
    finally:
        torch._dynamo.reset()
