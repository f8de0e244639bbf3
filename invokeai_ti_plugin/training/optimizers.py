"""The optimizer over the new word's vectors and its learning-rate schedule, built from the
config, and the norm limit.

Only the new vectors are parameters, so Prodigy's step-size estimate sees only them: with the
classic recipe's whole token table it also counts the frozen rows and its step size collapses
(kohya-ss/sd-scripts#980).
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from diffusers.optimization import get_scheduler
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from ..config import TrainingConfig

logger = logging.getLogger(__name__)


def scaled_learning_rate(config: TrainingConfig, num_processes: int) -> float:
    """--learning_rate, scaled by the effective batch when --scale_lr asks for it; Prodigy's
    rate multiplies its own estimate, which already follows the gradients it sees."""
    rate = config.learning_rate
    assert rate is not None  # filled in by the config from the optimizer
    if config.scale_lr and config.optimizer == "adamw":
        rate *= config.gradient_accumulation_steps * config.train_batch_size * num_processes
    return rate


def build_optimizer(
    config: TrainingConfig, vectors: list[nn.Parameter], rate: float
) -> torch.optim.Optimizer:
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy's own defaults otherwise: its warm-up safeguard, advised for diffusion
        # models, held the step size at its start (1e-6) for good in TI on the tiny pipeline.
        # It print()s a remark on weight decay, which would land in the middle of the progress
        # bar or the terminal form: it goes to the log instead.
        with contextlib.redirect_stdout(io.StringIO()) as remarks:
            optimizer = Prodigy(
                vectors,
                lr=rate,
                betas=betas,
                weight_decay=config.adam_weight_decay,
                eps=config.adam_epsilon,
            )
        for remark in remarks.getvalue().splitlines():
            logger.debug("prodigy: %s", remark)
        return optimizer
    return torch.optim.AdamW(
        vectors,
        lr=rate,
        betas=betas,
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def build_lr_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """The --lr_scheduler over the run. Warm-up steps that the scheduler ignores, or a warm-up
    the run ends inside, leave the rate other than the user meant: the log says so."""
    warmup, steps = config.lr_warmup_steps, config.max_train_steps
    if warmup and config.lr_scheduler == "constant":
        logger.warning(
            "--lr_warmup_steps %d has no effect with --lr_scheduler constant; choose "
            "constant_with_warmup (or another scheduler) for a warm-up",
            warmup,
        )
    elif warmup >= steps:
        logger.warning(
            "--lr_warmup_steps %d is not shorter than the run (--max_train_steps %d): the "
            "learning rate is still rising when it ends",
            warmup,
            steps,
        )
    return get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps
    )


@torch.no_grad()
def limit_norms(vectors: list[nn.Parameter], max_norm: float) -> None:
    """Scale down, in place, each vector (row) longer than `max_norm`; shorter ones stay."""
    for table in vectors:
        norms = table.norm(dim=-1, keepdim=True)
        table.mul_((max_norm / norms.clamp(min=max_norm)).to(table.dtype))
