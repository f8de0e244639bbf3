"""`invokeai-ti demo`: a whole training run in under a minute, with nothing to download.

It builds a tiny random-weight SD 1.x pipeline (real architecture and CLIP vocabulary) and a few
drawn pictures of one object, then trains on them exactly as a real run would. Newcomers see the
whole path work; the same pieces are the test-suite's fixtures.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .config import TrainingConfig
from .console import EXIT_BAD_INPUT, guarded, setup_logging, train_on_console
from .tiny_models import build_tiny_pipeline, make_demo_images

PROG = "invokeai-ti demo"
DEMO_TOKEN = "<striped-ball>"
DEMO_MODEL_NAME = "tiny-sd-1"


def demo_config(workdir: Path, steps: int) -> TrainingConfig:
    """A demo InvokeAI root with the tiny model installed, pictures, and a run sized for a CPU."""
    from .host.installed_models import install_main_model
    from .host.model_db import open_host_models

    model = build_tiny_pipeline(workdir / DEMO_MODEL_NAME, "sd-1")
    root = workdir / "invokeai-root"
    with open_host_models(root) as models:
        install_main_model(models, model.resolve(), DEMO_MODEL_NAME)
    data = workdir / "images"
    if not data.is_dir():
        make_demo_images(data, count=4)
    return TrainingConfig(
        model=DEMO_MODEL_NAME,
        placeholder_token=DEMO_TOKEN,
        initializer_token="ball",
        root=root,
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
        prog=PROG,
        description="Train an embedding on a tiny built-in model and drawn pictures, and "
        "register it in a demo InvokeAI root (no downloads).",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("invokeai-ti-demo"),
        help="where the model, pictures, InvokeAI root and output go (default: ./invokeai-ti-demo)",
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.steps <= 0:
        print(f"{PROG}: error: --steps must be a positive whole number (got {args.steps})")
        return EXIT_BAD_INPUT

    def run() -> int:
        print(f"Setting up the tiny demo model, pictures and InvokeAI root in {args.workdir} ...")
        return train_on_console(demo_config(args.workdir.absolute(), args.steps))

    return guarded(PROG, run)
