"""GPU check: our trainer against the classic loop on the true SD 1.5 and SDXL architectures.

Run by hand through `gpu_check.sh` (which first installs carried wheels where they are missing):

    bash benchmarks/gpu_check.sh                      # CUDA: SD 1.5 at 512 px, SDXL at 1024 px
    bash benchmarks/gpu_check.sh --tiny --device cpu  # the same on the tiny models, on a CPU

Nothing is downloaded: each model is built with random weights in a child process (on the GPU,
so in seconds; the UNet directly in 16 bits) and cached in --workdir. Every configuration (model,
batch, variant, gradient checkpointing) then runs in a fresh `bench_training.py` worker, so each
peak of `torch.cuda.max_memory_allocated` is its own. Configurations run in order of importance
(what the targets need first) under one time budget; each has its own time limit, after which
its worker measures no more updates, and those the budget has no room for are reported as
skipped. The JSON report is rewritten after every configuration, so a run cut short keeps what
it measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_training import (
    SD15_SCHEDULER,
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    WORKDIR,
    Variant,
    WorkerFailed,
    WorkerJob,
    WorkerResult,
    building_on,
    config_key,
    images_dir,
    random_sd15_pipeline,
    save_pipeline,
    spawn_worker,
    variant_label,
)

# The SDXL base architecture at its true sizes (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_TEXT_2: dict[str, Any] = {  # OpenCLIP ViT-bigG's text tower
    **SD15_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}
SDXL_VAE: dict[str, Any] = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
ARCHITECTURES: dict[str, tuple[dict[str, Any], ...]] = {
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULER),
    "sdxl": (SDXL_UNET, SDXL_VAE, SD15_TEXT, SDXL_TEXT_2, SDXL_SCHEDULER),
}
_DTYPE_NAMES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Model:
    """A model the check trains on, and how long each of its configurations may take."""

    name: str
    architecture: str  # sd15 or sdxl
    tiny: bool
    resolution: int
    steps: int  # measured updates after warm-up (fewer when the time limit comes first)
    time_limit: float  # seconds per configuration, worker start to its last update begun
    min_time: float  # a configuration is skipped when the budget has less than this left
    max_peak_mib: float | None  # the memory target at batch 1 (None: no target)
    card_gib: float  # the smallest card users train this model on (CUDA: played by the check)
    compile_s: float  # the time limit and min_time of a --torch_compile configuration add this


FULL_SIZE = (
    Model("sd15", "sd15", False, 512, 10, 75.0, 25.0, 4 * 1024.0, 8.0, 150.0),
    Model("sdxl", "sdxl", False, 1024, 5, 100.0, 45.0, 10 * 1024.0, 12.0, 240.0),
)
TINY = (
    Model("tiny-sd15", "sd15", True, 64, 2, 120.0, 5.0, None, 8.0, 300.0),
    Model("tiny-sdxl", "sdxl", True, 64, 2, 120.0, 5.0, None, 12.0, 300.0),
)
MIN_SPEEDUP = 1.5  # ours/classic steps/s at batch 1
RUN_UPDATES = 3000  # the default --max_train_steps: torch.compile must pay within such a run
# Warm-up before the measured updates: the first ones carry one-off costs (the allocator
# growing, cuBLAS/cuDNN choosing kernels). The counts date from when our trainer encoded each of
# the 8 image variants the first time a batch met it (the last came at update 12 at batch 1, 6
# at batch 4); it now encodes them before the first step, and the counts stay so that figures
# remain comparable with earlier runs.
WARMUP = {1: 12, 4: 6}
TINY_WARMUP = 2  # the tiny run proves the code paths; its timings mean nothing
# One device call of 8 minutes: wheels installed and torch imported in ~15 s, then this, then at
# most GRACE_S for a worker that overran its limit.
FULL_SIZE_BUDGET = 390.0
GRACE_S = 45.0  # past its time limit, a worker still saves its embedding and exits
QUIET = {  # the workers' output is the table, not loading bars
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class Setting:
    """How a worker is asked to train a model."""

    batch: int
    variant: Variant
    gradient_checkpointing: bool = False
    torch_compile: str = "off"
    on_card: bool = False  # CUDA: on the model's smallest card, our trainer choosing by itself

    @property
    def kind(self) -> str:
        """The name --only picks this setting by."""
        if self.on_card:
            return "card"
        if self.torch_compile != "off":
            return "compile"
        if self.gradient_checkpointing:
            return "ckpt"
        return self.variant


# Most important first: the targets' batch-1 runs, ours on the smallest card (does the memory plan
# choose checkpointing where it must?), torch.compile (does it pay within a run?), checkpointing
# asked for, then batch 4 and the classic loop checkpointed.
PLAN: tuple[Setting, ...] = (
    Setting(1, "ours"),
    Setting(1, "classic"),
    Setting(1, "ours", on_card=True),
    Setting(1, "ours", torch_compile="default"),
    Setting(1, "ours", gradient_checkpointing=True),
    Setting(1, "ours", torch_compile="reduce-overhead"),
    Setting(4, "ours"),
    Setting(4, "classic"),
    Setting(4, "ours", gradient_checkpointing=True),
    Setting(1, "classic", gradient_checkpointing=True),
    Setting(4, "ours", torch_compile="reduce-overhead"),  # does it still pay at a default batch?
)
COMPILE_MODES = ("default", "reduce-overhead")
SETTING_KINDS = ("ours", "classic", "card", "compile", "ckpt")


@dataclass(frozen=True)
class Configuration:
    model: Model
    setting: Setting

    @property
    def card_gib(self) -> float | None:
        return self.model.card_gib if self.setting.on_card else None

    @property
    def label(self) -> str:
        setting = self.setting
        return variant_label(
            setting.variant, setting.gradient_checkpointing, setting.torch_compile, self.card_gib
        )

    @property
    def title(self) -> str:
        return f"[{self.model.name}] {self.label}, batch {self.setting.batch}"


def plan(
    models: tuple[Model, ...],
    batches: list[int],
    compile_modes: list[str],
    kinds: tuple[str, ...] | list[str] = SETTING_KINDS,
) -> list[Configuration]:
    return [
        Configuration(model, setting)
        for setting in PLAN
        if setting.batch in batches
        and setting.torch_compile in ("off", *compile_modes)
        and setting.kind in kinds
        for model in models
    ]


# --------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------


def model_dir(workdir: Path, model: Model, mixed_precision: str) -> Path:
    if model.tiny:
        import invokeai_ti_plugin.tiny_models as tiny_models

        source = hashlib.sha256(Path(tiny_models.__file__).read_bytes()).hexdigest()
        return workdir / f"{model.name}-{source[:12]}"
    unet_dtype = _DTYPE_NAMES[mixed_precision]
    key = config_key(*ARCHITECTURES[model.architecture], unet_dtype)
    return workdir / f"{model.name}-random-{unet_dtype}-{key}"


def random_sdxl_pipeline(device: str, unet_dtype: Any) -> Any:
    """The SDXL base architecture with random weights on `device`; the UNet in `unet_dtype`."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from invokeai_ti_plugin.tiny_models import clip_tokenizer_dir

    with building_on(device, unet_dtype):
        unet = UNet2DConditionModel(**SDXL_UNET)
    with building_on(device):
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    tokenizers = clip_tokenizer_dir()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers, pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )


def build(architecture: str, folder: Path, device: str, mixed_precision: str) -> None:
    """Build one full-size model on `device` and save it: the UNet in the run's precision, the
    text encoders and VAE in float32 (the classic loop trains the token tables in float32, and
    our trainer keeps SDXL's VAE in float32)."""
    import torch

    started = time.perf_counter()
    torch.manual_seed(0)
    unet_dtype = getattr(torch, _DTYPE_NAMES[mixed_precision])
    builder = random_sd15_pipeline if architecture == "sd15" else random_sdxl_pipeline
    save_pipeline(builder(device, unet_dtype), folder, started)


def ensure_model(model: Model, folder: Path, device: str, mixed_precision: str) -> None:
    """Build the model unless it is cached, in a child process so that this one never holds
    GPU memory while the workers measure theirs."""
    if (folder / "model_index.json").is_file():
        return
    if model.tiny:
        from invokeai_ti_plugin.tiny_models import build_tiny_pipeline

        build_tiny_pipeline(folder, "sdxl" if model.architecture == "sdxl" else "sd-1")
        return
    command = [sys.executable, str(Path(__file__).resolve()), "--build", model.architecture]
    command += ["--folder", str(folder), "--mixed_precision", mixed_precision]
    print(f"[{model.name}] building the model on {device} ...", file=sys.stderr, flush=True)
    try:
        subprocess.run([*command, "--device", device], check=True)
    except subprocess.CalledProcessError:
        if device == "cpu":
            raise
        # the one GPU run must not be lost to a builder fault: the CPU builds the same model
        print(f"[{model.name}] building on {device} failed; on cpu now", file=sys.stderr)
        subprocess.run([*command, "--device", "cpu"], check=True)


# --------------------------------------------------------------------------------------------
# Running the plan
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One configuration's outcome: status ok with its measurements, or why there are none."""

    model: str
    resolution: int
    batch: int
    variant: Variant
    gradient_checkpointing: bool  # asked for (the result says whether it was on)
    torch_compile: str
    card_gib: float | None
    status: str  # ok, failed or skipped
    reason: str = ""
    result: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return variant_label(
            self.variant, self.gradient_checkpointing, self.torch_compile, self.card_gib
        )


def run_plan(args: argparse.Namespace, models: tuple[Model, ...], report: dict[str, Any]) -> None:
    started = time.monotonic()
    workdir: Path = args.workdir.expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    images = images_dir(workdir)
    folders: dict[str, Path] = {}
    unbuildable: dict[str, str] = {}  # model name -> why it could not be built
    for configuration in plan(models, args.batch, args.compile, args.only):
        model, setting = configuration.model, configuration.setting
        remaining = args.budget - (time.monotonic() - started)
        needed = model.min_time + (model.compile_s if setting.torch_compile != "off" else 0.0)
        row = Row(
            model.name,
            args.resolution or model.resolution,
            setting.batch,
            setting.variant,
            setting.gradient_checkpointing,
            setting.torch_compile,
            configuration.card_gib,
            status="failed",
        )
        report["rows"].append(row)
        if remaining < needed:
            row.status = "skipped"
            row.reason = f"the time budget had {max(remaining, 0):.0f} s left"
        elif setting.on_card and args.device != "cuda":
            row.status, row.reason = "skipped", "playing a smaller card needs CUDA"
        elif model.name in unbuildable:
            row.reason = unbuildable[model.name]
        else:
            try:
                if model.name not in folders:
                    folder = model_dir(workdir, model, args.mixed_precision)
                    ensure_model(model, folder, args.device, args.mixed_precision)
                    folders[model.name] = folder
                row.result = _measure(
                    args, configuration, row, folders[model.name], images, remaining
                )
                row.status = "ok"
            except subprocess.CalledProcessError as error:
                row.reason = unbuildable[model.name] = (
                    f"building the model failed (exit {error.returncode})"
                )
            except WorkerFailed as error:
                row.reason = str(error)
        if row.status != "ok":
            print(
                f"{configuration.title}: {row.status} ({row.reason})", file=sys.stderr, flush=True
            )
        report["elapsed_s"] = time.monotonic() - started
        report["comparisons"] = compare(report["rows"], models)
        write_report(report, args.json)


def _measure(
    args: argparse.Namespace,
    configuration: Configuration,
    row: Row,
    folder: Path,
    images: Path,
    remaining: float,
) -> dict[str, Any]:
    model, setting = configuration.model, configuration.setting
    time_limit = args.time_limit or model.time_limit
    if setting.torch_compile != "off":
        time_limit += model.compile_s
    time_limit = min(time_limit, remaining)
    with tempfile.TemporaryDirectory(prefix="gpu-check-compile-") as cache:
        job = WorkerJob(
            variant=setting.variant,
            model=model.name,
            model_dir=folder,
            images=images,
            resolution=row.resolution,
            steps=args.steps or model.steps,
            warmup=args.warmup or (TINY_WARMUP if model.tiny else WARMUP[setting.batch]),
            batch=setting.batch,
            device=args.device,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=setting.gradient_checkpointing,
            time_limit=time_limit,
            torch_compile=setting.torch_compile,
            card_gib=configuration.card_gib,
            # a user's first compiled run compiles from nothing; the tiny run's timings mean
            # nothing, and torch's shared cache saves the test minutes
            compile_cache=None if model.tiny else Path(cache),
        )
        result = spawn_worker(job, timeout=time_limit + GRACE_S)
    numbers = _row_numbers(result)
    print(
        f"{job.title}: {numbers['seconds_per_step']:.3f} s/step (median of "
        f"{numbers['measured_steps']}), peak {result.peak_mib:.0f} MiB (steady "
        f"{result.steady_peak_mib:.0f})",
        file=sys.stderr,
        flush=True,
    )
    return numbers


def _row_numbers(result: WorkerResult) -> dict[str, Any]:
    numbers = asdict(result)
    numbers["mean_seconds_per_step"] = result.seconds_per_step
    numbers["seconds_per_step"] = statistics.median(result.step_seconds)
    numbers["steps_per_s"] = 1.0 / numbers["seconds_per_step"]
    numbers["measured_steps"] = len(result.step_seconds)
    for key in ("first_loss", "last_loss"):  # NaN is not JSON; a random fp16 model may give it
        if not math.isfinite(numbers[key]):
            numbers[key] = None
    return numbers


def _find(rows: list[Row], model: str, setting: Setting) -> Row | None:
    """The measured row of `setting` (on its card, where it asks for one), if any."""
    for row in rows:
        asked = Setting(
            row.batch,
            row.variant,
            row.gradient_checkpointing,
            row.torch_compile,
            on_card=row.card_gib is not None,
        )
        if row.model == model and asked == setting:
            return row if row.status == "ok" else None
    return None


def compare(rows: list[Row], models: tuple[Model, ...]) -> list[dict[str, Any]]:
    """Each of our settings against the classic loop without checkpointing, per model and batch,
    with the issue's batch-1 verdicts (peak memory under the model's bound, steps/s at least
    MIN_SPEEDUP times the classic loop's); a compiled setting also against ours uncompiled: what
    compiling costs, and whether it pays within a RUN_UPDATES-update run."""
    comparisons: list[dict[str, Any]] = []
    for model in models:
        for batch in sorted({row.batch for row in rows if row.model == model.name}):
            classic = _find(rows, model.name, Setting(batch, "classic"))
            eager = _find(rows, model.name, Setting(batch, "ours"))
            for setting in PLAN:
                if setting.batch != batch or setting.variant != "ours":
                    continue
                ours = _find(rows, model.name, setting)
                if ours is None:
                    continue
                assert ours.result is not None
                entry: dict[str, Any] = {
                    "model": model.name,
                    "batch": batch,
                    "ours": ours.label,
                    "peak_mib": ours.result["peak_mib"],
                    "gradient_checkpointing_on": ours.result["gradient_checkpointing"],
                }
                if classic is not None:
                    assert classic.result is not None
                    speed = ours.result["steps_per_s"] / classic.result["steps_per_s"]
                    entry["speed_ratio"] = speed
                    entry["memory_ratio"] = ours.result["peak_mib"] / classic.result["peak_mib"]
                    entry["steady_memory_ratio"] = (
                        ours.result["steady_peak_mib"] / classic.result["steady_peak_mib"]
                    )
                    if batch == 1 and model.max_peak_mib is not None:
                        entry["verdicts"] = {
                            "speed": _verdict(speed >= MIN_SPEEDUP),
                            "memory": _verdict(ours.result["peak_mib"] <= model.max_peak_mib),
                        }
                if setting.torch_compile != "off" and eager is not None:
                    assert eager.result is not None
                    entry["compile"] = compile_payoff(ours.result, eager.result)
                if "speed_ratio" not in entry and "compile" not in entry:
                    continue  # nothing to set it against
                comparisons.append(entry)
    return comparisons


def compile_payoff(compiled: dict[str, Any], eager: dict[str, Any]) -> dict[str, Any]:
    """What compiling cost once (the compiled run's one-off time beyond its steady steps, less
    the uncompiled run's), what it saves per update, and after how many updates it has paid."""

    def one_off(numbers: dict[str, Any]) -> float:
        return numbers["time_to_steady_s"] - numbers["warmup"] * numbers["seconds_per_step"]

    cost = one_off(compiled) - one_off(eager)
    saved = eager["seconds_per_step"] - compiled["seconds_per_step"]
    break_even = max(cost, 0.0) / saved if saved > 0 else math.inf
    return {
        "compile_s": cost,
        "saved_s_per_update": saved,
        "break_even_updates": break_even if math.isfinite(break_even) else None,
        "run_s": {
            "updates": RUN_UPDATES,
            "uncompiled": one_off(eager) + RUN_UPDATES * eager["seconds_per_step"],
            "compiled": one_off(compiled) + RUN_UPDATES * compiled["seconds_per_step"],
        },
        "pays_within_run": _verdict(break_even <= RUN_UPDATES),
    }


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def write_report(report: dict[str, Any], path: Path) -> None:
    """Replace the JSON report whole, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**report, "rows": [asdict(row) for row in report["rows"]]}
    temp = path.with_name(f".{path.name}.partial")
    temp.write_text(json.dumps(data, indent=2))
    temp.replace(path)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def print_table(report: dict[str, Any], models: tuple[Model, ...]) -> None:
    rows: list[Row] = report["rows"]
    memory = "CUDA alloc" if report["device"] == "cuda" else "RSS"
    device_names = {row.result["device_name"] for row in rows if row.result}
    print(
        f"\nGPU check, {report['mixed_precision']} frozen parts, on "
        f"{', '.join(sorted(device_names)) or report['device']} ({report['started']}); "
        f"{report['elapsed_s']:.0f} s"
    )
    print(
        "s/step: median of the measured updates; peak: the whole run's; steady: the measured "
        "updates' alone; reserved: CUDA's caching allocator's peak; memory in MiB; ckpt: "
        "gradient checkpointing was on; busy: GPU kernel time per update (profiled after the "
        "measured ones) over s/step; 'on N GiB': all but N GiB of the GPU held"
    )
    for model in models:
        for batch in sorted({row.batch for row in rows if row.model == model.name}):
            resolution = next(row.resolution for row in rows if row.model == model.name)
            print(f"\n== {model.name}: {resolution} px, batch {batch}")
            print(
                f"{'variant':<40} {'s/step':>7} {'steps/s':>7} {'peak ' + memory:>15} "
                f"{'steady':>7} {'reserved':>8} {'ckpt':>4} {'busy':>5} {'1st-step s':>10} "
                f"{'updates':>7}"
            )
            for row in rows:
                if (row.model, row.batch) != (model.name, batch):
                    continue
                if row.result is None:
                    print(f"{row.label:<40} {row.status}: {row.reason}")
                    continue
                r = row.result
                print(
                    f"{row.label:<40} {r['seconds_per_step']:>7.3f} {r['steps_per_s']:>7.2f} "
                    f"{r['peak_mib']:>15.0f} {r['steady_peak_mib']:>7.0f} "
                    f"{r['peak_reserved_mib']:>8.0f} "
                    f"{'yes' if r['gradient_checkpointing'] else 'no':>4} {_busy(r):>5} "
                    f"{r['first_step_s']:>10.1f} {r['measured_steps']:>7d}"
                )
            for entry in report["comparisons"]:
                if (entry["model"], entry["batch"]) == (model.name, batch):
                    print(_comparison_line(entry, model))


def _busy(numbers: dict[str, Any]) -> str:
    kernels = numbers.get("gpu_kernel_s_per_step")
    return "-" if kernels is None else f"{kernels / numbers['seconds_per_step']:.0%}"


def _comparison_line(entry: dict[str, Any], model: Model) -> str:
    line = f"  {entry['ours']}"
    if "speed_ratio" in entry:
        verdicts = entry.get("verdicts", {})
        speed = f"steps/s {entry['speed_ratio']:.2f}x"
        if verdicts:
            speed += f" (target >= {MIN_SPEEDUP}x: {verdicts['speed']})"
        peak = f"peak {entry['peak_mib']:.0f} MiB"
        if verdicts and model.max_peak_mib is not None:
            peak += f" (target <= {model.max_peak_mib:.0f}: {verdicts['memory']})"
        line += (
            f"/classic: {speed}, peak memory {entry['memory_ratio']:.2f}x "
            f"(steady {entry['steady_memory_ratio']:.2f}x); {peak}"
        )
    payoff = entry.get("compile")
    if payoff:
        run = payoff["run_s"]
        after = payoff["break_even_updates"]
        line += (
            f"\n    compiling cost {payoff['compile_s']:.0f} s and saves "
            f"{payoff['saved_s_per_update'] * 1000:.1f} ms/update: pays after "
            f"{'never' if after is None else f'{after:.0f} updates'} ({payoff['pays_within_run']} "
            f"within {run['updates']}); a {run['updates']}-update run "
            f"{run['uncompiled'] / 60:.1f} -> {run['compiled'] / 60:.1f} min"
        )
    return line


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _default_json() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else Path(__file__).with_name("gpu_check.json")


def _subset_of(known: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of `known`, in the order given ('' for none);
    anything else is refused in one line that names the choices."""

    def parse(text: str) -> list[str]:
        chosen = list(dict.fromkeys(part for part in text.split(",") if part))
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; use {', '.join(known)}"
            )
        return chosen

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test models, 64 px")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: auto")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="frozen parts in both loops (fp16: CUDA only); default: fp16 on cuda, no on cpu",
    )
    parser.add_argument(
        "--models",
        type=_subset_of(tuple(ARCHITECTURES)),
        default=list(ARCHITECTURES),
        help="comma-separated subset of sd15,sdxl, in the order to measure (default: both)",
    )
    parser.add_argument(
        "--batch",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 4],
        help="batch sizes, comma-separated (default: 1,4)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for all configurations together (default {FULL_SIZE_BUDGET:.0f}; none "
        "with --tiny)",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="px, for every model (default: its native)"
    )
    parser.add_argument(
        "--compile",
        type=_subset_of(COMPILE_MODES),
        default=list(COMPILE_MODES),
        help="--torch_compile modes to measure ours with, comma-separated (default: "
        f"{','.join(COMPILE_MODES)}; '' for none)",
    )
    parser.add_argument(
        "--only",
        type=_subset_of(SETTING_KINDS),
        default=None,
        help="kinds of configuration to run, comma-separated: ours (uncompiled, all of memory), "
        "classic, card (ours on the smallest card), compile, ckpt (checkpointing asked for); "
        "default: all. A split lease measures the rest in a second call",
    )
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="updates before measuring")
    parser.add_argument("--steps", type=int, default=None, help="measured updates")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=WORKDIR,
        help="where the built models and images are cached between runs",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="the report (default: $OUT/gpu_check.json when OUT is set, else "
        "benchmarks/gpu_check.json)",
    )
    # Internal: the model builder's child process.
    parser.add_argument("--build", choices=sorted(ARCHITECTURES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    if args.device == "cpu" and args.mixed_precision == "fp16" and not args.build:
        parser.error("--mixed_precision fp16 needs --device cuda")
    if args.only is None:
        args.only = list(SETTING_KINDS)
    else:  # a lease is too short to spend on a run that measures nothing it was asked for
        planned = {
            configuration.setting.kind
            for configuration in plan(FULL_SIZE, args.batch, args.compile)
        }
        if missing := [kind for kind in args.only if kind not in planned]:
            parser.error(
                f"--only {','.join(missing)}: the plan has none at batch "
                f"{','.join(map(str, args.batch))}"
                + (" (compile rows need --compile)" if "compile" in missing else "")
            )
    if args.json is None:
        args.json = _default_json()
    if args.budget is None:
        args.budget = math.inf if args.tiny else FULL_SIZE_BUDGET
    return args


def _selected(args: argparse.Namespace) -> tuple[Model, ...]:
    """The models --models names, in its order (FULL_SIZE and TINY hold one per architecture)."""
    by_architecture = {model.architecture: model for model in (TINY if args.tiny else FULL_SIZE)}
    return tuple(by_architecture[name] for name in args.models)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.build:
        build(args.build, args.folder, args.device, args.mixed_precision)
        return
    models = _selected(args)
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    import torch

    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "budget_s": args.budget if math.isfinite(args.budget) else None,
        "elapsed_s": 0.0,
        "targets": {
            "min_speed_ratio": MIN_SPEEDUP,
            "max_peak_mib": {model.name: model.max_peak_mib for model in models},
        },
        "rows": [],
        "comparisons": [],
    }
    run_plan(args, models, report)
    print_table(report, models)
    print(f"\nwrote {args.json}")
    if any(row.status == "failed" for row in report["rows"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
