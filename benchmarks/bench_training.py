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
import contextlib
import cProfile
import hashlib
import io
import itertools
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psutil  # accelerate's dependency: the worker's own start time

if TYPE_CHECKING:
    import torch

RESULT_MARKER = "BENCH_RESULT "
PLACEHOLDER = "<bench-ball>"
INITIALIZER = "ball"
LEARNING_RATE = 5e-3
SEED = 1234
NUM_IMAGES = 4
# Warm-up: the first updates carry one-off costs (the allocator growing, kernels chosen). 12 is
# kept from when ours encoded each (image, flip) variant the first time a batch met it (the last
# of the 8 came at update 12), so that figures stay comparable with those runs'.
DEFAULT_WARMUP = 12
BUSY_CORES = 0.25  # cores used by other processes above which CPU timings are suspect
WORKDIR = Path.home() / ".cache" / "invokeai-ti-plugin" / "benchmarks"  # models and images, reused
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
    steady_peak_mib: float = 0.0  # the peak over the measured updates alone (reset after warm-up)
    peak_reserved_mib: float = 0.0  # CUDA: the most the caching allocator held; 0 on CPU
    gradient_checkpointing: bool = False  # on in this run: asked for, or chosen by our trainer
    device_name: str = ""
    time_to_steady_s: float = 0.0  # from the process's start to the end of the warm-up
    warmup: int = 0  # updates before the measured ones
    torch_compile: str = "off"  # ours: --torch_compile
    card_gib: float | None = None  # CUDA: the GPU was cut to a card of this size (see --card-gib)
    gpu_kernel_s_per_step: float | None = None  # CUDA: kernel time per update (KernelTimer)

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.seconds_per_step


# --------------------------------------------------------------------------------------------
# Models and images, built once and reused
# --------------------------------------------------------------------------------------------


def config_key(*parts: object) -> str:
    """A short hash of what a cached model was built from: a changed recipe rebuilds it."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tiny_model_dir(workdir: Path) -> Path:
    import invokeai_ti_plugin.tiny_models as tiny_models

    key = hashlib.sha256(Path(tiny_models.__file__).read_bytes()).hexdigest()[:12]
    return workdir / f"tiny-sd1-{key}"


def sd15_model_dir(workdir: Path) -> Path:
    return workdir / f"sd15-random-{config_key(SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULER)}"


@contextmanager
def building_on(device: str, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Create modules with their parameters on `device`, in `dtype` if given: a GPU initialises
    random weights in no time, and a half-precision model is built without a float32 copy twice
    its size first. Import the classes before: diffusers imports its modules on first use, and
    some make tensors as they load, which must not land on the GPU."""
    import torch

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_sd15_pipeline(device: str = "cpu", unet_dtype: torch.dtype | None = None) -> Any:
    """The SD 1.5 architecture with random weights on `device`; the UNet in `unet_dtype`."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from invokeai_ti_plugin.tiny_models import clip_tokenizer_dir

    with building_on(device, unet_dtype):
        unet = UNet2DConditionModel(**SD15_UNET)
    with building_on(device):
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir()),
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipeline: Any, folder: Path, started: float) -> None:
    """Write the pipeline folder aside, then rename it: a crash never leaves half a model."""
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
        flush=True,
    )


def build_model(model: ModelName, folder: Path) -> None:
    """Write the pipeline folder unless it is already there."""
    if (folder / "model_index.json").is_file():
        return
    if model == "tiny":
        from invokeai_ti_plugin.tiny_models import build_tiny_pipeline

        build_tiny_pipeline(folder, "sd-1")
        return
    import torch

    started = time.perf_counter()
    torch.manual_seed(0)
    save_pipeline(random_sd15_pipeline(), folder, started)


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

    def __init__(
        self,
        started_at: float,
        cuda: bool,
        warmup: int,
        measured: int,
        time_limit: float | None = None,
    ) -> None:
        self.started_at = started_at  # wall clock of the process's start
        self.cuda = cuda
        self.warmup = warmup
        self.end = warmup + measured  # the last measured update; a few profiled ones follow
        self.kernel_timer = KernelTimer() if cuda else None
        self.time_limit = time_limit  # seconds from the start after which no update is begun
        self.times: list[float] = []
        self.losses: list[float] = []
        self.first_step_s = 0.0
        self.peak_at_first = 0.0
        self.peak = 0.0
        self.peak_before_measuring = 0.0
        self.steady_peak = 0.0
        self.reserved_peak = 0.0
        self.cpu_at_start = _busy_cpu_seconds()
        self.cpu_at_warmup = (0.0, 0.0)
        self.other_cores = 0.0
        self.other_cores_to_first = 0.0
        self.imports_mib = 0.0
        self.ballast_mib = 0.0  # CUDA memory held to play a smaller card, left out of the peaks

    def mark_imports_done(self) -> None:
        """Memory once torch, diffusers and transformers are imported: about the same in both
        variants (~1.1 GiB with a CUDA build of torch); the peak above it is the recipe's own."""
        self.imports_mib = self.peak_mib() if not self.cuda else 0.0

    def peak_mib(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20 - self.ballast_mib
        return _peak_rss_mib()

    def reserved_mib(self) -> float:
        if not self.cuda:
            return 0.0
        import torch

        return torch.cuda.max_memory_reserved() / 2**20 - self.ballast_mib

    @property
    def total_updates(self) -> int:
        """The measured updates, then (CUDA) those the kernel timer profiles."""
        return self.end + (KernelTimer.UPDATES if self.kernel_timer else 0)

    def on_step(self, step: int, loss: float) -> bool:
        """Record a finished update; True when the time limit says to stop after it."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        if step > self.end:  # a profiled update, timed by its kernels alone
            assert self.kernel_timer is not None
            if step == self.total_updates:
                self.kernel_timer.stop()
            return self._out_of_time(step)
        self.times.append(time.perf_counter())
        self.losses.append(loss)
        # read at every update, so the end-of-run saving is left out
        peak = self.peak_mib()
        self.reserved_peak = max(self.reserved_peak, self.reserved_mib())
        if step <= self.warmup:
            self.peak = peak
        else:
            self.steady_peak = peak
            self.peak = max(self.peak_before_measuring, peak)
        if step == 1:
            self.first_step_s = time.time() - self.started_at
            self.peak_at_first = peak
        busy, own = _busy_cpu_seconds()
        if step == 1:
            others = (busy - self.cpu_at_start[0]) - (own - self.cpu_at_start[1])
            self.other_cores_to_first = max(0.0, others) / max(self.first_step_s, 1e-9)
        if step == self.warmup:
            self.cpu_at_warmup = (busy, own)
            self.peak_before_measuring = peak
            _reset_peak_memory(self.cuda)
        elif step > self.warmup:
            wall = self.times[-1] - self.times[self.warmup - 1]
            others = (busy - self.cpu_at_warmup[0]) - (own - self.cpu_at_warmup[1])
            self.other_cores = max(0.0, others) / wall
        if step == self.end and self.kernel_timer:
            self.kernel_timer.start()
        return self._out_of_time(step)

    def _out_of_time(self, step: int) -> bool:
        """Past warm-up, stop when one more update like the last would end after the limit."""
        if self.time_limit is None or step <= self.warmup:
            return False
        last_step = self.times[-1] - self.times[-2]
        return time.time() - self.started_at + last_step > self.time_limit

    def result(self, args: argparse.Namespace, gradient_checkpointing: bool) -> WorkerResult:
        # times[k] ends update k + 1, so update k + 1 took times[k] - times[k - 1].
        measured = [b - a for a, b in itertools.pairwise(self.times[self.warmup - 1 : self.end])]
        if not measured:
            raise RuntimeError("no measured steps: need steps >= 1 after warm-up")
        return WorkerResult(
            variant=args.worker,
            model=args.model,
            device=args.device,
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
            steady_peak_mib=self.steady_peak,
            peak_reserved_mib=self.reserved_peak,
            gradient_checkpointing=gradient_checkpointing,
            device_name=_device_name(self.cuda),
            time_to_steady_s=self.first_step_s + self.times[self.warmup - 1] - self.times[0],
            warmup=self.warmup,
            torch_compile=args.torch_compile,
            card_gib=args.card_gib,
            gpu_kernel_s_per_step=self.kernel_timer.seconds_per_update
            if self.kernel_timer
            else None,
        )


class KernelTimer:
    """The GPU's kernel time per update, over a few updates after the measured ones, from
    torch's profiler (CUDA activity only). Set against the unprofiled s/step it says how busy
    the GPU was: a step it is idle in waits on Python launching kernels, which is what
    torch.compile and CUDA graphs cut. The same updates' host time, by Python function, goes to
    the log, to say where that waiting comes from (kernels run asynchronously, so a function's
    time is the host's, save where it waits for the GPU). Never fails a run: a profiler fault
    leaves no figure."""

    UPDATES = 3
    HOST_ROWS = 25

    def __init__(self) -> None:
        self.profile: Any = None
        self.host = cProfile.Profile()
        self.seconds_per_update: float | None = None

    def start(self) -> None:
        try:
            from torch.profiler import ProfilerActivity, profile

            self.profile = profile(activities=[ProfilerActivity.CUDA])
            self.profile.start()
        except Exception as error:  # a measurement extra: never the run's end
            print(f"kernel timer: not started ({error})", file=sys.stderr)
            self.profile = None
        self.host.enable()

    def stop(self) -> None:
        self.host.disable()
        table = io.StringIO()
        stats = pstats.Stats(self.host, stream=table).strip_dirs()
        for order in ("tottime", "cumulative"):  # where the time is; which of our calls holds it
            stats.sort_stats(order).print_stats(self.HOST_ROWS)
        print(
            f"host time of the {self.UPDATES} profiled updates:\n{table.getvalue()}",
            file=sys.stderr,
        )
        if self.profile is None:
            return
        try:
            self.profile.stop()
            micros = sum(
                getattr(event, "self_device_time_total", 0.0)
                for event in self.profile.key_averages()
            )
            self.seconds_per_update = micros / 1e6 / self.UPDATES
        except Exception as error:  # a measurement extra: never the run's end
            print(f"kernel timer: no figure ({error})", file=sys.stderr)


def _smaller_card(card_gib: float, clock: StepClock) -> torch.Tensor:
    """Hold all of the GPU's memory but `card_gib` GiB, so that the run meets what a card of that
    size has free (our trainer's memory plan reads it) and runs out of memory where that card
    would. The held memory is left out of the peaks the clock reports."""
    import torch

    _free, total = torch.cuda.mem_get_info()
    size = total - int(card_gib * 2**30)
    if size <= 0:
        raise SystemExit(f"--card-gib {card_gib:g}: the GPU has only {total / 2**30:.1f} GiB")
    ballast = torch.empty(size, dtype=torch.uint8, device="cuda")
    clock.ballast_mib = size / 2**20
    return ballast


def _reset_peak_memory(cuda: bool) -> None:
    """Start a new peak, so that the measured updates' own peak is known apart from warm-up's
    (one-off latent encoding). On Linux, writing 5 to /proc/self/clear_refs resets VmHWM."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # elsewhere the steady peak stays the whole run's
        Path("/proc/self/clear_refs").write_text("5")


def _device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_ours(args: argparse.Namespace, clock: StepClock, total_steps: int) -> bool:
    """Our real code path: a TrainingConfig run by Trainer, timed by its progress callback.
    Returns whether the run had gradient checkpointing on (asked for, or chosen by itself)."""
    from invokeai_ti_plugin.config import TrainingConfig
    from invokeai_ti_plugin.training.reports import ProgressUpdate
    from invokeai_ti_plugin.training.trainer import Trainer

    clock.mark_imports_done()

    def progress(update: ProgressUpdate) -> None:
        if clock.on_step(update.step, update.loss):
            trainer.request_stop()  # the time limit: end after this update, as Ctrl-C does

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
            gradient_checkpointing=args.gradient_checkpointing,
            torch_compile=args.torch_compile,
            seed=SEED,
            checkpointing_steps=total_steps + 1,
            # no sample grid at the end (it is not training time), but on a small card: there
            # the question is whether a default run fits, and the grid decodes 1024-px images
            num_validation_images=4 if args.card_gib else 0,
            # nor the evaluation loss, measured before the first update and within the last
            # (8 denoising passes per image): the classic loop has none (bench_samples and the
            # README give what these cost a run)
            eval_loss=False,
            only_save_embeds=True,
            overwrite=True,
        )
        trainer = Trainer(config, on_progress=progress)
        with _logged("invokeai_ti_plugin.training.training_run") as messages:
            trainer.run()
    return any(message.startswith("gradient checkpointing on") for message in messages)


@contextmanager
def _logged(logger_name: str) -> Iterator[list[str]]:
    """The INFO messages `logger_name` logs meanwhile: what our trainer decided by itself."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run_classic(args: argparse.Namespace, clock: StepClock, total_steps: int) -> bool:
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
        gradient_checkpointing=args.gradient_checkpointing,
        cpu=args.device == "cpu",
    )
    train_classic(settings, clock.on_step)
    return args.gradient_checkpointing


def run_worker(args: argparse.Namespace) -> None:
    """Train one variant and print its measurements as one marked JSON line on stdout."""
    started_at = psutil.Process().create_time()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    clock = StepClock(
        started_at,
        cuda=args.device == "cuda",
        warmup=args.warmup,
        measured=args.steps,
        time_limit=args.time_limit,
    )
    runner: Callable[[argparse.Namespace, StepClock, int], bool] = (
        _run_ours if args.worker == "ours" else _run_classic
    )
    ballast = _smaller_card(args.card_gib, clock) if args.card_gib else None
    checkpointing = runner(args, clock, clock.total_updates)
    del ballast
    result = clock.result(args, checkpointing)
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------------------------
# Parent side: build, spawn, compare
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerJob:
    """One variant's run, as the parent asks a fresh worker process for it."""

    variant: Variant
    model: str  # a label for the report
    model_dir: Path
    images: Path
    resolution: int
    steps: int
    warmup: int
    batch: int
    device: str
    mixed_precision: str
    threads: int | None = None
    gradient_checkpointing: bool = False
    time_limit: float | None = None  # seconds from the worker's start: then it measures no more
    torch_compile: str = "off"  # ours only
    card_gib: float | None = None  # CUDA only: play a card of this size
    compile_cache: Path | None = None  # torch.compile's caches (None: torch's own, shared)

    @property
    def title(self) -> str:
        label = variant_label(
            self.variant, self.gradient_checkpointing, self.torch_compile, self.card_gib
        )
        return f"[{self.model}] {label}, batch {self.batch}"

    def command(self) -> list[str]:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            self.variant,
            "--model",
            self.model,
            "--model-dir",
            str(self.model_dir),
            "--images-dir",
            str(self.images),
            "--resolution",
            str(self.resolution),
            "--steps",
            str(self.steps),
            "--warmup",
            str(self.warmup),
            "--batch",
            str(self.batch),
            "--device",
            self.device,
            "--mixed_precision",
            self.mixed_precision,
        ]
        if self.threads:
            command += ["--threads", str(self.threads)]
        if self.gradient_checkpointing:
            command.append("--gradient-checkpointing")
        if self.time_limit is not None:
            command += ["--time-limit", str(self.time_limit)]
        if self.torch_compile != "off":
            command += ["--torch-compile", self.torch_compile]
        if self.card_gib is not None:
            command += ["--card-gib", str(self.card_gib)]
        return command


def variant_label(
    variant: str, gradient_checkpointing: bool, torch_compile: str, card_gib: float | None
) -> str:
    """`ours +compile(default) on 12 GiB`: a variant and what was asked of it."""
    label = variant
    if gradient_checkpointing:
        label += " +checkpointing"
    if torch_compile != "off":
        label += f" +compile({torch_compile})"
    if card_gib is not None:
        label += f" on {card_gib:g} GiB"
    return label


class WorkerFailed(RuntimeError):
    """A worker crashed, printed no result, or ran past its timeout."""


def spawn_worker(job: WorkerJob, timeout: float | None = None) -> WorkerResult:
    """Run `job` in a fresh process (killed after `timeout` seconds) and read its result."""
    env = dict(os.environ)
    if job.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our trainer uses whatever device accelerate finds
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if job.compile_cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(job.compile_cache / "inductor")
        env["TRITON_CACHE_DIR"] = str(job.compile_cache / "triton")
    print(f"{job.title}: running ...", file=sys.stderr, flush=True)
    try:
        completed = subprocess.run(
            job.command(),
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
            cwd=Path.cwd(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        raise WorkerFailed(f"{job.title}: timed out after {timeout:.0f} s") from error
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout)
        raise WorkerFailed(f"{job.title}: the worker failed (exit {completed.returncode})")
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
    precision = "fp32" if args.mixed_precision == "no" else args.mixed_precision
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
    parser.add_argument("--model", default="both", help="tiny, sd15 or both")
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
        help=f"updates run before measuring (default {DEFAULT_WARMUP}: past the one-off costs)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: auto")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="frozen parts in 16 bits in both loops (fp16: GPU only); default: fp16 on cuda, no "
        "on cpu",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=WORKDIR,
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
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time-limit", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--torch-compile",
        choices=["off", "default", "reduce-overhead"],
        default="off",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--card-gib", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and args.model not in (*MODELS, "both"):
        parser.error(f"--model must be one of {', '.join(MODELS)} or both")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    if args.device == "cpu" and args.mixed_precision == "fp16":
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
                job = WorkerJob(
                    variant,
                    model,
                    model_dir,
                    images,
                    resolution,
                    steps,
                    args.warmup,
                    args.batch,
                    args.device,
                    args.mixed_precision,
                    args.threads,
                )
                try:
                    result = spawn_worker(job)
                except WorkerFailed as error:
                    raise SystemExit(str(error)) from error
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
