"""Time our textual-inversion trainer against the classic recipe, in one run, on models built here.

Run by hand (not in CI):

    .venv/bin/python benchmarks/bench_training.py --model both

Each variant runs in its own fresh process, so its peak memory is its own and its time to the first
step includes imports and loading the model from disk. The parent builds the models once (cached
in --workdir), warms the OS file cache before every worker so neither pays for a cold disk, runs
the workers, and prints the table, the ratios ours/classic and whether each target is met.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil  # accelerate's dependency: the worker's own start time

RESULT_MARKER = "BENCH_RESULT "
PLACEHOLDER = "<bench-ball>"
INITIALIZER = "ball"
LEARNING_RATE = 5e-3
SEED = 1234
NUM_IMAGES = 4
# Ours encodes each (image, flip) variant the first time a batch meets it; with SEED and
# NUM_IMAGES above, the last of the 8 variants comes at update 12. Warming up that long measures
# the steady state; the one-off encodes show in the first-step and time-to-last-step columns.
DEFAULT_WARMUP = 12
BUSY_CORES = 0.25  # cores used by other processes above which CPU timings are suspect
IMAGE_SIZE = 512  # drawn larger than any benchmark resolution: loading always scales down

ModelName = Literal["tiny", "sd15"]
Variant = Literal["ours", "classic"]
MODELS: tuple[ModelName, ...] = ("tiny", "sd15")
VARIANTS: tuple[Variant, ...] = ("ours", "classic")
DEFAULT_RESOLUTION: dict[str, int] = {"tiny": 64, "sd15": 256}
DEFAULT_STEPS: dict[str, int] = {"tiny": 20, "sd15": 5}


@dataclass(frozen=True)
class Target:
    """What the issue asks of ours/classic on CPU; None where it sets no target."""

    min_speed: float | None
    max_memory: float | None
    max_first_step: float | None


TARGETS: dict[str, Target] = {
    "tiny": Target(min_speed=3.0, max_memory=0.5, max_first_step=None),
    "sd15": Target(min_speed=1.25, max_memory=0.75, max_first_step=1.0),
}

# The real SD 1.5 architecture at its true sizes; the weights are random.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class WorkerResult:
    """What one worker measured; times in seconds, memory in MiB."""

    variant: str
    model: str
    device: str
    first_step_s: float
    last_step_s: float  # from the process's start to the end of the last measured update
    seconds_per_step: float
    peak_mib: float
    peak_mib_at_first_step: float
    imports_mib: float  # peak RSS right after the imports, before any model is loaded (CPU)
    other_cores: float  # CPU cores other processes kept busy during the measured steps
    other_cores_to_first: float  # ... and from the worker's start to its first step
    threads: int
    step_seconds: list[float] = field(default_factory=list)
    first_loss: float = 0.0
    last_loss: float = 0.0

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.seconds_per_step


# --------------------------------------------------------------------------------------------
# Models and images, built once and reused
# --------------------------------------------------------------------------------------------


def _config_key(*parts: object) -> str:
    """A short hash of what a cached model was built from: a changed recipe rebuilds it."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tiny_model_dir(workdir: Path) -> Path:
    import invokeai_ti_plugin.tiny_models as tiny_models

    key = hashlib.sha256(Path(tiny_models.__file__).read_bytes()).hexdigest()[:12]
    return workdir / f"tiny-sd1-{key}"


def sd15_model_dir(workdir: Path) -> Path:
    return workdir / f"sd15-random-{_config_key(SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULER)}"


def build_model(model: ModelName, folder: Path) -> None:
    """Write the pipeline folder unless it is already there (built aside, then renamed)."""
    if (folder / "model_index.json").is_file():
        return
    if model == "tiny":
        from invokeai_ti_plugin.tiny_models import build_tiny_pipeline

        build_tiny_pipeline(folder, "sd-1")
        return
    import diffusers
    import torch
    import transformers

    from invokeai_ti_plugin.tiny_models import clip_tokenizer_dir

    started = time.perf_counter()
    torch.manual_seed(0)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**SD15_VAE),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir()),
        unet=diffusers.UNet2DConditionModel(**SD15_UNET),
        scheduler=diffusers.PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    temp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex}"
    try:
        pipeline.save_pretrained(temp, safe_serialization=True)
        temp.rename(folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30
    print(
        f"built {folder} ({size:.2f} GiB) in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )


def images_dir(workdir: Path) -> Path:
    """The same demo photos for every model and variant; each resizes them to its resolution."""
    from invokeai_ti_plugin.tiny_models import make_demo_images

    folder = workdir / f"images-{NUM_IMAGES}x{IMAGE_SIZE}"
    if len(list(folder.glob("*.png"))) != NUM_IMAGES:
        make_demo_images(folder, count=NUM_IMAGES, size=IMAGE_SIZE)
    return folder


def wait_until_idle(max_wait_s: float) -> float:
    """Wait (up to `max_wait_s`) until other processes leave the cores alone; CPU timings taken
    beside a busy process are meaningless. Returns the cores still busy when it stopped waiting."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy_cores = psutil.cpu_percent(interval=2.0) / 100 * (psutil.cpu_count() or 1)
        if busy_cores <= BUSY_CORES or time.monotonic() >= deadline:
            return busy_cores
        print(f"waiting for an idle machine ({busy_cores:.2f} cores busy) ...", file=sys.stderr)


def warm_file_cache(folder: Path) -> None:
    """Read the model files once so both variants load from the OS cache, not a cold disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                while file.read(1 << 24):
                    pass


# --------------------------------------------------------------------------------------------
# Worker side: one variant, one fresh process
# --------------------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    """This process's peak resident memory.

    On Linux, VmHWM of /proc/self/status: ru_maxrss would do, except that a child started by
    vfork/exec inherits its parent's peak into it, so the parent's own memory would leak in.
    Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _busy_cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (all cores) and by this process."""
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


class StepClock:
    """Timestamps each finished update, the memory peak so far, and how busy the machine was.

    Other processes competing for the cores distort CPU timings badly (torch's threads wait on
    each other), so the CPU time other processes used up to the first step and during the
    measured steps is kept, to flag a disturbed run.
    """

    def __init__(self, started_at: float, cuda: bool, warmup: int) -> None:
        self.started_at = started_at  # wall clock of the process's start
        self.cuda = cuda
        self.warmup = warmup
        self.times: list[float] = []
        self.losses: list[float] = []
        self.first_step_s = 0.0
        self.peak_at_first = 0.0
        self.peak = 0.0
        self.cpu_at_start = _busy_cpu_seconds()
        self.cpu_at_warmup = (0.0, 0.0)
        self.other_cores = 0.0
        self.other_cores_to_first = 0.0
        self.imports_mib = 0.0

    def mark_imports_done(self) -> None:
        """Memory once torch, diffusers and transformers are imported: about the same in both
        variants (~1.1 GiB with a CUDA build of torch); the peak above it is the recipe's own."""
        self.imports_mib = self.peak_mib() if not self.cuda else 0.0

    def peak_mib(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return _peak_rss_mib()

    def on_step(self, step: int, loss: float) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.losses.append(loss)
        if step == 1:
            self.first_step_s = time.time() - self.started_at
            self.peak_at_first = self.peak_mib()
        self.peak = self.peak_mib()  # at the last update: the end-of-run saving is left out
        busy, own = _busy_cpu_seconds()
        if step == 1:
            others = (busy - self.cpu_at_start[0]) - (own - self.cpu_at_start[1])
            self.other_cores_to_first = max(0.0, others) / max(self.first_step_s, 1e-9)
        if step == self.warmup:
            self.cpu_at_warmup = (busy, own)
        elif step > self.warmup:
            wall = self.times[-1] - self.times[self.warmup - 1]
            others = (busy - self.cpu_at_warmup[0]) - (own - self.cpu_at_warmup[1])
            self.other_cores = max(0.0, others) / wall

    def result(self, variant: str, model: str, device: str) -> WorkerResult:
        # times[k] ends update k + 1, so update k + 1 took times[k] - times[k - 1].
        measured = [b - a for a, b in itertools.pairwise(self.times[self.warmup - 1 :])]
        if not measured:
            raise RuntimeError("no measured steps: need steps >= 1 after warm-up")
        return WorkerResult(
            variant=variant,
            model=model,
            device=device,
            first_step_s=self.first_step_s,
            last_step_s=self.first_step_s + self.times[-1] - self.times[0],
            seconds_per_step=sum(measured) / len(measured),
            peak_mib=self.peak,
            peak_mib_at_first_step=self.peak_at_first,
            imports_mib=self.imports_mib,
            other_cores=self.other_cores,
            other_cores_to_first=self.other_cores_to_first,
            threads=_torch_threads(),
            step_seconds=measured,
            first_loss=self.losses[0],
            last_loss=self.losses[-1],
        )


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_ours(args: argparse.Namespace, clock: StepClock, total_steps: int) -> None:
    """Our real code path: a TrainingConfig run by Trainer, timed by its progress callback."""
    from invokeai_ti_plugin.config import TrainingConfig
    from invokeai_ti_plugin.training.trainer import ProgressUpdate, Trainer

    clock.mark_imports_done()

    def progress(update: ProgressUpdate) -> None:
        clock.on_step(update.step, update.loss)

    with tempfile.TemporaryDirectory(prefix="bench-ours-") as out:
        config = TrainingConfig(
            model=str(args.model_dir),
            placeholder_token=PLACEHOLDER,
            initializer_token=INITIALIZER,
            learnable_property="object",
            root=Path(out),
            train_data_dir=args.images_dir,
            output_dir=Path(out) / "output",
            resolution=args.resolution,
            train_batch_size=args.batch,
            max_train_steps=total_steps,
            learning_rate=LEARNING_RATE,
            scale_lr=False,
            lr_scheduler="constant",
            mixed_precision=args.mixed_precision,
            enable_xformers_memory_efficient_attention=False,
            gradient_checkpointing=False,
            seed=SEED,
            checkpointing_steps=total_steps + 1,
            only_save_embeds=True,
            overwrite=True,
        )
        Trainer(config, on_progress=progress).run()


def _run_classic(args: argparse.Namespace, clock: StepClock, total_steps: int) -> None:
    """The reference loop, with the same settings and AdamW values as our config's defaults."""
    from classic_loop import ClassicSettings, train_classic

    from invokeai_ti_plugin.config import TrainingConfig

    clock.mark_imports_done()
    defaults = TrainingConfig.model_fields
    settings = ClassicSettings(
        model_dir=args.model_dir,
        images_dir=args.images_dir,
        resolution=args.resolution,
        batch_size=args.batch,
        max_steps=total_steps,
        learning_rate=LEARNING_RATE,
        seed=SEED,
        mixed_precision=args.mixed_precision,
        placeholder_token=PLACEHOLDER,
        initializer_token=INITIALIZER,
        learnable_property="object",
        adam_beta1=defaults["adam_beta1"].default,
        adam_beta2=defaults["adam_beta2"].default,
        adam_weight_decay=defaults["adam_weight_decay"].default,
        adam_epsilon=defaults["adam_epsilon"].default,
        cpu=args.device == "cpu",
    )
    train_classic(settings, clock.on_step)


def run_worker(args: argparse.Namespace) -> None:
    """Train one variant and print its measurements as one marked JSON line on stdout."""
    started_at = psutil.Process().create_time()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    clock = StepClock(started_at, cuda=args.device == "cuda", warmup=args.warmup)
    total_steps = args.warmup + args.steps
    runner: Callable[[argparse.Namespace, StepClock, int], None] = (
        _run_ours if args.worker == "ours" else _run_classic
    )
    runner(args, clock, total_steps)
    result = clock.result(args.worker, args.model, args.device)
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------------------------
# Parent side: build, spawn, compare
# --------------------------------------------------------------------------------------------


def spawn_worker(
    variant: Variant,
    model: ModelName,
    model_dir: Path,
    images: Path,
    resolution: int,
    steps: int,
    args: argparse.Namespace,
) -> WorkerResult:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        variant,
        "--model",
        model,
        "--model-dir",
        str(model_dir),
        "--images-dir",
        str(images),
        "--resolution",
        str(resolution),
        "--steps",
        str(steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--mixed_precision",
        args.mixed_precision,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our trainer uses whatever device accelerate finds
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"[{model}] running {variant} ...", file=sys.stderr, flush=True)
    completed = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, text=True, check=False, cwd=Path.cwd()
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout)
        raise SystemExit(f"the {variant} worker for {model} failed (exit {completed.returncode})")
    data = json.loads(lines[-1].removeprefix(RESULT_MARKER))
    return WorkerResult(**data)


def compare(model: str, ours: WorkerResult, classic: WorkerResult) -> dict[str, Any]:
    """Ratios ours/classic and the verdict on each target."""
    target = TARGETS[model]
    ratios = {
        "speed": ours.steps_per_s / classic.steps_per_s,
        "memory": ours.peak_mib / classic.peak_mib,
        "first_step": ours.first_step_s / classic.first_step_s,
        "last_step": ours.last_step_s / classic.last_step_s,
        "memory_above_imports": (ours.peak_mib - ours.imports_mib)
        / max(classic.peak_mib - classic.imports_mib, 1e-9),
    }
    verdicts: dict[str, str | None] = {
        "speed": None
        if target.min_speed is None
        else _verdict(ratios["speed"] >= target.min_speed),
        "memory": (
            None if target.max_memory is None else _verdict(ratios["memory"] <= target.max_memory)
        ),
        "first_step": (
            None
            if target.max_first_step is None
            else _verdict(ratios["first_step"] <= target.max_first_step)
        ),
    }
    return {"ratios": ratios, "targets": asdict(target), "verdicts": verdicts}


def _disturbed(result: WorkerResult) -> bool:
    return max(result.other_cores, result.other_cores_to_first) > BUSY_CORES


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(
    model: str,
    resolution: int,
    steps: int,
    args: argparse.Namespace,
    results: list[WorkerResult],
    cmp: dict[str, Any],
) -> None:
    target = TARGETS[model]
    device = results[0].device
    memory_kind = "peak CUDA alloc" if device == "cuda" else "peak RSS"
    precision = "fp16" if args.mixed_precision == "fp16" else "fp32"
    print(f"\n== {model}: {resolution} px, batch {args.batch}, {device}, {precision} frozen parts")
    print(f"   mean of {steps} steps after {args.warmup} warm-up; each variant in its own process")
    print(
        f"{'variant':<8} {'s/step':>8} {'steps/s':>8} {memory_kind + ' MiB':>18} "
        f"{'(at 1st step)':>13} {'(imports)':>9} {'first-step s':>12} {'last-step s':>11} "
        f"{'others CPU':>11}  loss 1st->last"
    )
    for r in results:
        print(
            f"{r.variant:<8} {r.seconds_per_step:>8.3f} {r.steps_per_s:>8.2f} {r.peak_mib:>18.0f} "
            f"{r.peak_mib_at_first_step:>13.0f} {r.imports_mib:>9.0f} {r.first_step_s:>12.2f} "
            f"{r.last_step_s:>11.2f} {r.other_cores_to_first:>5.2f}/{r.other_cores:<5.2f}  "
            f"{r.first_loss:.4f}->{r.last_loss:.4f}"
        )
    busy = [r.variant for r in results if device == "cpu" and _disturbed(r)]
    if busy:
        print(
            f"WARNING: other processes used > {BUSY_CORES} cores while {', '.join(busy)} ran "
            f"({results[0].threads} torch threads): these timings are disturbed; rerun when idle"
        )
    ratios, verdicts = cmp["ratios"], cmp["verdicts"]
    rows = [
        ("steps/s", ratios["speed"], target.min_speed, ">=", verdicts["speed"]),
        ("peak memory", ratios["memory"], target.max_memory, "<=", verdicts["memory"]),
        (
            "first-step time",
            ratios["first_step"],
            target.max_first_step,
            "<=",
            verdicts["first_step"],
        ),
    ]
    rows.append(("time to last step", ratios["last_step"], None, "", None))
    if device == "cpu":
        rows.insert(2, ("  above imports", ratios["memory_above_imports"], None, "", None))
    print("ours/classic:")
    for name, value, bound, sign, verdict in rows:
        goal = f"target {sign} {bound:g}x" if bound is not None else "no target"
        print(f"  {name:<18} {value:6.2f}x   ({goal}) {verdict or ''}".rstrip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument(
        "--resolution", type=int, default=None, help="default: 64 for tiny, 256 for sd15"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="measured steps (default: 20 tiny, 5 sd15)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help=f"updates run before measuring (default {DEFAULT_WARMUP}: until ours has met every "
        "image variant once)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: auto")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16"],
        default=None,
        help="frozen parts in fp16 in both loops (GPU only); default: fp16 on cuda, no on cpu",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path.home() / ".cache" / "invokeai-ti-plugin" / "benchmarks",
        help="where the built models and images are cached between runs",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=300.0,
        help="on CPU, wait up to this many seconds for other processes to go quiet before each "
        "variant (0: don't wait)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="on CPU, run a variant again (up to this many times) when other processes were busy",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    # Internal: the parent starts each variant with these.
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    if args.device == "cpu" and args.mixed_precision != "no":
        parser.error("--mixed_precision fp16 needs --device cuda")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step carries one-off costs)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    import torch

    workdir: Path = args.workdir.expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    models: tuple[ModelName, ...] = MODELS if args.model == "both" else (args.model,)
    images = images_dir(workdir)
    report: dict[str, Any] = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "mixed_precision": args.mixed_precision,
        "batch": args.batch,
        "warmup": args.warmup,
        "learning_rate": LEARNING_RATE,
        "num_images": NUM_IMAGES,
        "models": {},
    }
    for model in models:
        model_dir = tiny_model_dir(workdir) if model == "tiny" else sd15_model_dir(workdir)
        build_model(model, model_dir)
        resolution = args.resolution or DEFAULT_RESOLUTION[model]
        steps = args.steps or DEFAULT_STEPS[model]
        results: list[WorkerResult] = []
        for variant in VARIANTS:
            for attempt in range(args.retries + 1):
                warm_file_cache(model_dir)
                if args.device == "cpu" and args.wait_idle > 0:
                    wait_until_idle(args.wait_idle)
                result = spawn_worker(variant, model, model_dir, images, resolution, steps, args)
                if not (args.device == "cpu" and _disturbed(result)) or attempt == args.retries:
                    break
                print(
                    f"[{model}] {variant} was disturbed by other processes; again", file=sys.stderr
                )
            results.append(result)
        ours, classic = results
        cmp = compare(model, ours, classic)
        print_report(model, resolution, steps, args, results, cmp)
        report["models"][model] = {
            "resolution": resolution,
            "steps": steps,
            "model_dir": str(model_dir),
            "ours": asdict(ours),
            "classic": asdict(classic),
            **cmp,
        }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
