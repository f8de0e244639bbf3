"""What sample grids cost a training run: one grid's time against one step's, in one run.

A grid (4 images, 20 DPM-Solver steps, classifier-free guidance) is drawn every
`--validation_steps` (default 500) and at the end, so a default 3000-step run draws 6. This
runs the real `Trainer` with a grid after step `--grid-at`, times every step through the
progress callback, and reports the grid's time, the median step's, and the share of a default
run spent on grids. Run by hand; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from bench_training import WORKDIR, build_model, images_dir, sd15_model_dir, tiny_model_dir

from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.training.reports import ProgressUpdate
from invokeai_ti_plugin.training.trainer import Trainer

DEFAULT_STEPS = 3000
DEFAULT_GRIDS = DEFAULT_STEPS // 500  # at 500, 1000, ..., 2500 and at the end


def measure(model_dir: Path, images: Path, resolution: int, batch: int, grid_at: int) -> None:
    stamps: list[float] = []

    def clock(update: ProgressUpdate) -> None:
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = TrainingConfig(
            model=str(model_dir),
            placeholder_token="<bench-ball>",
            initializer_token="ball",
            train_data_dir=images,
            output_dir=Path(out),
            root=Path(out) / "root",
            resolution=resolution,
            train_batch_size=batch,
            max_train_steps=2 * grid_at,
            validation_steps=grid_at,
            num_validation_images=4,
            checkpointing_steps=10 * grid_at,
            mixed_precision="no",
            enable_xformers_memory_efficient_attention=False,
            seed=0,
        )
        Trainer(config, on_progress=clock).run()
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    grid_gap = gaps[grid_at - 1]  # from step grid_at to grid_at + 1: one step and the grid
    steady = gaps[grid_at // 2 : grid_at - 1] + gaps[grid_at:]  # past warm-up, without the grid
    step = statistics.median(steady)
    grid = grid_gap - step
    share = DEFAULT_GRIDS * grid / (DEFAULT_STEPS * step + DEFAULT_GRIDS * grid)
    print(f"{model_dir.name}: {resolution} px, batch {batch}")
    print(f"  one step {step:.3f} s, one grid {grid:.2f} s ({grid / step:.1f} steps)")
    print(
        f"  default run ({DEFAULT_STEPS} steps, {DEFAULT_GRIDS} grids): "
        f"{100 * share:.1f}% of the time on grids (target < 10%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--resolution", type=int, help="default: 64 (tiny), 256 (sd15)")
    parser.add_argument("--batch", type=int, default=3, help="the default without xformers")
    parser.add_argument("--grid-at", type=int, default=6, help="step after which a grid is drawn")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    args = parser.parse_args()
    folder = tiny_model_dir(args.workdir) if args.model == "tiny" else sd15_model_dir(args.workdir)
    build_model(args.model, folder)
    resolution = args.resolution or (64 if args.model == "tiny" else 256)
    measure(folder, images_dir(args.workdir), resolution, args.batch, args.grid_at)


if __name__ == "__main__":
    main()
