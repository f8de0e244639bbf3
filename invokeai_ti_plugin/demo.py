"""`invokeai-ti demo`: a whole training run in under a minute, with nothing to download.

It builds a tiny random-weight SD 1.x pipeline (real architecture and CLIP vocabulary) and a few
drawn pictures of one object, then trains on them exactly as a real run would. Newcomers see the
whole path work; the same pieces are the test-suite's fixtures.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .cli import EXIT_BAD_INPUT, PROG, report, setup_logging, train
from .config import TrainingConfig
from .errors import UserInputError
from .tiny_models import build_tiny_pipeline, make_demo_images

DEMO_TOKEN = "<striped-ball>"


def demo_config(workdir: Path, steps: int) -> TrainingConfig:
    """Tiny model and pictures under `workdir`, and a run sized for a CPU."""
    model = build_tiny_pipeline(workdir / "tiny-sd-1", "sd-1")
    data = workdir / "images"
    if not data.is_dir():
        make_demo_images(data, count=4)
    return TrainingConfig(
        model=str(model),
        placeholder_token=DEMO_TOKEN,
        initializer_token="ball",
        train_data_dir=data,
        output_dir=workdir / "output",
        max_train_steps=steps,
        checkpointing_steps=max(1, steps // 2),
        train_batch_size=2,
        learning_rate=5e-3,
        scale_lr=False,
        mixed_precision="no",
        seed=0,
        overwrite=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} demo",
        description="Train an embedding on a tiny built-in model and drawn pictures "
        "(no downloads).",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("invokeai-ti-demo"),
        help="where model, images and output go",
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.steps <= 0:
            raise UserInputError(
                f"must be a positive whole number (got {args.steps})", option="steps"
            )
        print(f"Building the tiny demo model and pictures in {args.workdir} ...")
        return report(train(demo_config(args.workdir, args.steps)))
    except UserInputError as error:
        print(f"{PROG} demo: error: {error}")
        return EXIT_BAD_INPUT
