"""How many updates each training setting needs to get a given share of the way down.

Run by hand (not in CI); see benchmarks/README.md:

    .venv/bin/python benchmarks/bench_convergence.py --quick

Each setting (the defaults, min-SNR-gamma, Prodigy, the norm limit) trains with several seeds on
the same model and images with the real `Trainer`, measuring the fixed-noise evaluation loss
every `--every` updates. The evaluation is the same for every run (it does not depend on the
seed), so all runs share one starting value; the achievable drop is that start minus the lowest
evaluation loss any run reached. Printed per setting: the updates needed to reach `--fraction`
of that drop (median, min-max over seeds, how many seeds reached it) and the final loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_training import WORKDIR, build_model, images_dir, sd15_model_dir, tiny_model_dir

from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.training.model_files import inspect_model, load_model_parts
from invokeai_ti_plugin.training.new_tokens import initializer_vectors
from invokeai_ti_plugin.training.trainer import Trainer

PLACEHOLDER = "<bench-ball>"
INITIALIZER = "ball"
SETTINGS = ("default", "min-snr", "prodigy", "norm-limit")
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 64}


@dataclass(frozen=True)
class Run:
    setting: str
    seed: int
    curve: list[tuple[int, float]]  # (step, evaluation loss), from step 0


def initializer_norm(model_dir: Path) -> float:
    """The norm of the initializer's vector: the norm-limit setting keeps the word there."""
    parts = load_model_parts(inspect_model(model_dir))
    vector = initializer_vectors(parts.tokenizers[0], parts.text_encoders[0], INITIALIZER, 1)
    return float(vector.norm())


def setting_options(setting: str, norm: float) -> dict[str, Any]:
    """What each setting changes from the product's defaults (AdamW, 5e-4 scaled by batch)."""
    return {
        "default": {},
        "min-snr": {"snr_gamma": 5.0},
        "prodigy": {"optimizer": "prodigy"},
        "norm-limit": {"max_embedding_norm": norm},
    }[setting]


def train(args: argparse.Namespace, model_dir: Path, setting: str, norm: float, seed: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-convergence-") as out:
        config = TrainingConfig(
            model=str(model_dir),
            placeholder_token=PLACEHOLDER,
            initializer_token=INITIALIZER,
            root=Path(out),
            train_data_dir=args.images_dir,
            output_dir=Path(out) / "output",
            resolution=args.resolution,
            train_batch_size=args.batch,
            max_train_steps=args.steps,
            validation_steps=args.every,
            num_validation_images=0,
            checkpointing_steps=args.steps,
            mixed_precision="no",
            enable_xformers_memory_efficient_attention=False,
            seed=seed,
            **setting_options(setting, norm),
        )
        result = Trainer(config).run()
        summary = json.loads(result.summary_path.read_text())
        lines = (config.out_dir / "logs" / "history.jsonl").read_text().splitlines()
    curve = [(0, float(summary["evaluation"]["start"]))]
    curve += [(r["step"], r["eval_loss"]) for r in map(json.loads, lines) if "eval_loss" in r]
    return Run(setting, seed, curve)


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value <= target), None)


def report(model: str, runs: list[Run], fraction: float, steps: int) -> None:
    start = runs[0].curve[0][1]
    lowest = min(value for run in runs for _, value in run.curve)
    target = start - fraction * (start - lowest)
    print(f"\n{model}: start {start:.6f}, lowest reached {lowest:.6f} (drop {start - lowest:.3g});")
    print(f"updates to reach {fraction:.0%} of that drop (evaluation loss <= {target:.6f}):")
    print(f"{'setting':<12} {'median':>8} {'min-max':>12} {'reached':>8} {'final loss':>12}")
    for setting in dict.fromkeys(run.setting for run in runs):
        mine = [run for run in runs if run.setting == setting]
        reached = [s for s in (steps_to_reach(run.curve, target) for run in mine) if s is not None]
        # a seed that never got there counts as more than the whole run, for the median
        needed = sorted(reached) + [steps + 1] * (len(mine) - len(reached))

        def shown(count: float) -> str:
            return f">{steps}" if count > steps else f"{count:g}"

        spread = f"{shown(needed[0])}-{shown(needed[-1])}"
        final = statistics.median(run.curve[-1][1] for run in mine)
        print(
            f"{setting:<12} {shown(statistics.median(needed)):>8} {spread:>12} "
            f"{len(reached):>5}/{len(mine):<2} {final:>12.6f}"
        )


def bench(args: argparse.Namespace, model: str) -> None:
    model_dir = tiny_model_dir(args.workdir) if model == "tiny" else sd15_model_dir(args.workdir)
    build_model(model, model_dir)  # type: ignore[arg-type]
    args.images_dir = images_dir(args.workdir)
    args.resolution = args.resolution_override or DEFAULT_RESOLUTION[model]
    norm = initializer_norm(model_dir)
    print(f"{model}: initializer norm {norm:.4f}", file=sys.stderr)
    runs: list[Run] = []
    for setting in args.settings:
        for seed in range(args.seeds):
            started = time.perf_counter()
            run = train(args, model_dir, setting, norm, seed)
            runs.append(run)
            print(
                f"  {setting} seed {seed}: {time.perf_counter() - started:.0f} s, "
                f"final {run.curve[-1][1]:.6f}",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n[{model}, {args.resolution} px, batch {args.batch}, {args.steps} updates, evaluated "
        f"every {args.every}, {args.seeds} seeds]"
    )
    report(model, runs, args.fraction, args.steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "sd15", "both"], default="tiny")
    parser.add_argument("--quick", action="store_true", help="tiny, 80 updates, 2 seeds")
    parser.add_argument("--steps", type=int, default=150, help="updates per run")
    parser.add_argument("--every", type=int, default=5, help="updates between evaluations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", dest="resolution_override", type=int)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    args = parser.parse_args(argv)
    args.settings = args.settings.split(",")
    if unknown := set(args.settings) - set(SETTINGS):
        parser.error(f"unknown settings {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.quick:
        args.model, args.steps, args.seeds = "tiny", 80, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for model in ("tiny", "sd15") if args.model == "both" else (args.model,):
        bench(args, model)


if __name__ == "__main__":
    main()
