"""The one source of truth for training options.

Every front end (the command line, the terminal form, the web UI's node) builds a
`TrainingConfig`; nothing else parses or validates options. Field names and defaults follow the
InvokeAI 2.3 textual-inversion manual, and each field's description is the help text users see,
so docs cannot drift from code.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import UserInputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})

LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)
MixedPrecision = Literal["no", "fp16", "bf16"]
OptimizerName = Literal["adamw", "prodigy"]
TorchCompile = Literal["off", "default", "reduce-overhead"]  # torch.compile's own mode names
# --learning_rate's default for each optimizer: Prodigy's rate multiplies its own estimate
DEFAULT_LEARNING_RATES: dict[str, float] = {"adamw": 5e-4, "prodigy": 1.0}
LearnableProperty = Literal["object", "style"]


def xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def default_batch_size() -> int:
    """8 with xformers, else 3: the manual's sizes that fit a 12 GB GPU."""
    return 8 if xformers_installed() else 3


def default_mixed_precision() -> MixedPrecision:
    """fp16 where a CUDA GPU can run it, full precision elsewhere (CPUs have no fast fp16)."""
    import torch  # here, not above: the command line starts (and obeys Ctrl-C) before torch loads

    return "fp16" if torch.cuda.is_available() else "no"


PROMPT_NAME = re.compile(r"[A-Za-z0-9._-]+")  # what InvokeAI's `<name>` prompt syntax can reach
MAX_NAME_LENGTH = 100  # a folder name on every file system, with room to spare
# what Windows reserves for devices, with or without an extension: no folder can take the name
WINDOWS_DEVICE_NAME = re.compile(r"(?i)(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?")
MAX_VECTORS = 75  # a CLIP prompt holds 77 tokens: start, 75, end
# the latent is 1/8 of the image and the UNet halves it three times: 64 px reaches 1 latent px
MIN_RESOLUTION = 64
MAX_RESOLUTION = 2048  # twice SDXL's native 1024; larger squares exceed any GPU's memory
SEED_MAX = 2**32 - 1  # InvokeAI's own seed range (invokeai.app.util.misc.SEED_MAX)
MAX_BATCH_SIZE = 256  # far beyond what one GPU holds; gradient accumulation goes further
MAX_VALIDATION_IMAGES = 16  # the sample grid is rendered in one batch
# Far past any rate that learns (such a run diverges, and says so), and short of float32's
# 3.4e38, where the optimizer itself failed with a traceback, even once scaled by --scale_lr
MAX_LEARNING_RATE = 1e30


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an embedding, or None. Names become folder names
    (ROOT/embeddings/<name>/...), so one that climbs ('..'), hides ('.x') or is no folder name
    on Windows is refused like any other that InvokeAI's `<name>` prompt syntax cannot reach."""
    if not PROMPT_NAME.fullmatch(name):
        return "may use only letters, digits, '.', '_' and '-', so that InvokeAI prompts reach it"
    if name.startswith("."):
        return "must not start with '.': as a folder name it would climb ('..') or be hidden"
    if name.endswith("."):
        return "must not end with '.': Windows drops it from a folder name ('a.' is 'a')"
    if WINDOWS_DEVICE_NAME.fullmatch(name):
        return "is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9), not a folder"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    return None


def trigger_of(placeholder_token: str) -> str:
    """The trigger term, `psychedelic` for `<psychedelic>`: names folders and the host model."""
    return placeholder_token.strip().removeprefix("<").removesuffix(">")


class TrainingConfig(BaseModel):
    """Everything one textual-inversion training run needs."""

    # nan and inf are refused for every float option: no optimizer setting survives them
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    model: str = Field(
        description="The base model: the name or key of a model installed in InvokeAI (see "
        "--list-models; diffusers folders and single-file checkpoints alike), or a folder "
        "holding a Stable Diffusion 1.x, 2.x or SDXL diffusers pipeline. An embedding only "
        "works with models of the same base as this one."
    )
    placeholder_token: str = Field(
        description="The new word to teach, e.g. '<psychedelic>'. It must not already be a word "
        "of the model's vocabulary; angle brackets keep it unique. Use it in prompts as "
        "`<psychedelic>`."
    )
    initializer_token: str = Field(
        default="*",
        description="Existing word(s) whose vectors seed the new word. '*' is neutral; a word "
        "or phrase close to the concept ('painting', 'red ball') can converge faster.",
    )
    num_vectors: int = Field(
        default=1,
        description="How many token vectors the new word stands for. More vectors can hold "
        "more detail but need more steps. They start from the initializer's tokens: one each "
        "when the counts match, repeated in turn when it has fewer, averaged in consecutive "
        "groups when it has more.",
    )
    learnable_property: LearnableProperty = Field(
        default="object",
        description="What the images share: 'object' (a thing: 'a photo of a <token>') or "
        "'style' (a look: 'a painting in the style of <token>'). Chooses the prompt templates.",
    )
    root: Path = Field(  # no default here: front ends ask the host (host/app_config.find_root)
        description="The InvokeAI root folder, where models are registered and the default "
        "data and output folders live. Default: $INVOKEAI_ROOT, else the parent of the active "
        "virtualenv, else the parent of the virtualenv this command is installed in when that "
        "is an InvokeAI root (the launcher's ROOT/.venv), else ~/invokeai.",
    )
    train_data_dir: Path | None = Field(
        default=None,
        validate_default=True,
        description="Folder of 3-20 training images (PNG, JPEG or WebP, any size). "
        "Default: ROOT/text-inversion-training-data/<trigger>.",
    )
    output_dir: Path | None = Field(
        default=None,
        validate_default=True,
        description="Where checkpoints, logs and the embedding are written. "
        "Default: ROOT/text-inversion-output/<trigger>.",
    )
    resolution: int | None = Field(
        default=None,
        description="Images are scaled to this square size in pixels (a multiple of 8, "
        "64 to 2048). Default: the model's native size (512 for SD 1.x, 768 for SD 2.x 768-px "
        "models, 1024 for SDXL).",
    )
    center_crop: bool = Field(
        default=False,
        description="Crop images to a centred square before scaling, instead of stretching "
        "them. Can cut off the tops of portrait-shaped subjects.",
    )
    train_batch_size: int = Field(
        default_factory=default_batch_size,
        description="Images per step on each GPU. Larger is faster but needs more memory. "
        "Default: 8 when xformers is installed, else 3.",
    )
    gradient_accumulation_steps: int = Field(
        default=1,
        description="Add up gradients over this many batches before each update: a larger "
        "effective batch in the same memory, at the cost of time per update.",
    )
    max_train_steps: int = Field(
        default=3000,
        description="Number of updates to train for. Most concepts converge in 2000-3000.",
    )
    optimizer: OptimizerName = Field(
        default="adamw",
        description="'adamw' (the manual's) or 'prodigy', which estimates its own step size as "
        "it goes: no learning rate to tune (--learning_rate then multiplies its estimate and "
        "defaults to 1.0). Its first updates are tiny while the estimate grows from 1e-6 (it "
        "still got halfway down sooner than adamw on this project's benchmark), and it keeps a "
        "little more optimizer state.",
    )
    learning_rate: float | None = Field(
        default=None,
        validate_default=True,
        description="Step size of the updates. Higher learns faster but risks over-training "
        "(every image alike); 5e-4 is conservative, 5e-3 is fast. With --optimizer prodigy it "
        "multiplies Prodigy's own estimate: keep 1.0. Default: 5e-4 with adamw, 1.0 with "
        "prodigy.",
    )
    scale_lr: bool = Field(
        default=True,
        description="Multiply the learning rate by GPUs x batch size x accumulation steps, "
        "so that larger effective batches keep the same per-image learning speed. Not applied "
        "with --optimizer prodigy, which finds its step size itself.",
    )
    snr_gamma: float | None = Field(
        default=None,
        description="Min-SNR-gamma loss weighting (arXiv 2303.09556): the updates weigh "
        "low-noise timesteps, whose easy loss otherwise dominates, down to the SNR gamma, "
        "for epsilon and v-prediction models alike. Typical: 5. It changes what the training "
        "loss measures (the evaluation loss stays unweighted); on this project's benchmark it "
        "made no measurable difference in speed (see benchmarks/README.md). Default: off.",
    )
    max_embedding_norm: float | None = Field(
        default=None,
        description="After each update, scale down every learned vector whose length exceeds "
        "this. Keeps the word from overpowering the rest of the prompt (the usual sign of an "
        "over-trained embedding), but can slow the learning of a strong concept. Typical: "
        "about the initializer's norm, which the run logs when it starts (for SDXL, each "
        "encoder's; the same limit holds for both). Default: no limit.",
    )
    lr_scheduler: LrScheduler = Field(
        default="constant",
        description="How the learning rate changes over the run: " + ", ".join(LR_SCHEDULERS) + ".",
    )
    lr_warmup_steps: int = Field(
        default=0,
        description="Updates over which the learning rate ramps up from zero. Only used by "
        "schedulers with warmup (constant_with_warmup, linear, cosine, ...), not 'constant'.",
    )
    adam_beta1: float = Field(
        default=0.9, description="AdamW's (and Prodigy's) first-moment decay."
    )
    adam_beta2: float = Field(
        default=0.999, description="AdamW's (and Prodigy's) second-moment decay."
    )
    adam_weight_decay: float = Field(
        default=1e-2, description="AdamW's (and Prodigy's) weight decay on the learned vectors."
    )
    adam_epsilon: float = Field(default=1e-8, description="AdamW's (and Prodigy's) epsilon.")
    mixed_precision: MixedPrecision = Field(
        default_factory=default_mixed_precision,
        description="Run the frozen model in 16-bit: 'fp16' (GPUs), 'bf16' (recent GPUs and "
        "CPUs) or 'no' (full 32-bit). The learned vectors always stay 32-bit. "
        "Default: fp16 with a CUDA GPU, else no.",
    )
    enable_xformers_memory_efficient_attention: bool = Field(
        default_factory=xformers_installed,
        description="Use xformers attention (less memory, allows larger batches). Without "
        "xformers installed, torch's scaled-dot-product attention is used instead. "
        "Default: on when xformers is installed.",
    )
    validation_prompt: str | None = Field(
        default=None,
        description="Prompt for the sample images drawn while training; it should contain the "
        "placeholder token. Default: the first object or style template with the token.",
    )
    num_validation_images: int = Field(
        default=4,
        description="Sample images per grid (0: no samples). Each grid uses the same seeds, "
        "so grids from different steps are comparable.",
    )
    validation_steps: int = Field(
        default=500,
        description="Draw a sample grid and measure the evaluation loss every this many "
        "updates and at the end (0: only at the end). Grids go to OUTPUT_DIR/samples/.",
    )
    eval_loss: bool = Field(
        default=True,
        description="Measure the evaluation loss at the start, every --validation_steps and at "
        "the end: the denoising loss over every training image and its mirror, at fixed "
        "timesteps with fixed noise, so it moves only when the embedding does (the training "
        "loss jumps with its random timesteps). Logged to logs/history.jsonl, TensorBoard and "
        "loss.png; the best step is recorded in embedding.json. Costs a few seconds per "
        "measurement (8 denoising passes per image, no backward pass).",
    )
    save_best: bool = Field(
        default=False,
        description="Also keep the embedding of the lowest evaluation loss, as "
        "learned_embeds-best.safetensors beside the last one: a guard against over-training "
        "late in a run. Needs --eval_loss; the best is only as fine-grained as "
        "--validation_steps.",
    )
    report_to: Literal["none", "tensorboard"] = Field(
        default="none",
        description="Also log the loss, the evaluation loss and the learning rate for "
        "TensorBoard (OUTPUT_DIR/logs/tensorboard), if tensorboard is installed.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute UNet activations during the backward pass instead of storing "
        "them: much less GPU memory for 1.5-2x the time per step. Off by default, but turned on "
        "by itself (and said in the log) when the GPU's free memory is short for a step "
        "without it.",
    )
    torch_compile: TorchCompile = Field(
        default="off",
        description="Compile the UNet for the training step with torch.compile: 'default' fuses "
        "its kernels, 'reduce-overhead' also replays them as CUDA graphs. The first step then "
        "takes minutes (compiling; less once torch has cached it) and later steps are faster: "
        "on an H200, 'default' paid for a first compile only after about 6,700 (SD 1.5) or "
        "15,000 (SDXL) updates; 'reduce-overhead' made steps 2-3x faster and paid after about "
        "800-1,600 (see the README's GPU figures). Needs triton on a CUDA GPU, a C++ compiler "
        "on a CPU.",
    )
    seed: int | None = Field(
        default=None,
        description="Random seed for a reproducible run. Default: a fresh one, recorded in "
        "the output so the run can be repeated.",
    )
    checkpointing_steps: int = Field(
        default=500,
        description="Save a resumable checkpoint every this many updates (each is a few MB).",
    )
    resume_from_checkpoint: str | None = Field(
        default=None,
        description="Continue an interrupted run: 'latest' (the newest checkpoint in the "
        "output folder) or the path of a checkpoint folder.",
    )
    only_save_embeds: bool = Field(
        default=True,
        description="Save only the learned embedding (small). With --no-only_save_embeds a "
        "complete diffusers pipeline with the new word built in is saved too, in the "
        "precision of the model's files.",
    )
    register_embedding: bool = Field(
        default=True,
        description="When training ends, copy the embedding to ROOT/embeddings/<trigger>/<base>/ "
        "and register it with InvokeAI, so <trigger> works in its prompts at once.",
    )
    overwrite: bool = Field(
        default=False,
        description="Replace an embedding or checkpoints that the output folder already holds "
        "from an earlier run, instead of stopping with an error.",
    )

    @field_validator("placeholder_token")
    @classmethod
    def _token_is_one_word(cls, value: str) -> str:
        if not value.strip() or any(ch.isspace() for ch in value.strip()):
            raise ValueError(
                f"{value!r} must be one word without spaces, for example '<psychedelic>'"
            )
        problem = name_problem(trigger_of(value))
        if problem:
            raise ValueError(f"{value!r}: the trigger inside the angle brackets {problem}")
        return value.strip()

    @field_validator("initializer_token")
    @classmethod
    def _initializer_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a single token such as '*' or 'painting'")
        return value.strip()

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and (value % 8 or not MIN_RESOLUTION <= value <= MAX_RESOLUTION):
            raise ValueError(
                f"must be a positive multiple of 8 from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
                f"such as 512 (got {value})"
            )
        return value

    @field_validator(
        "num_vectors",
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "checkpointing_steps",
    )
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be a positive whole number (got {value})")
        return value

    @field_validator("num_vectors")
    @classmethod
    def _vectors_fit_a_prompt(cls, value: int) -> int:
        if value > MAX_VECTORS:
            raise ValueError(
                f"must be at most {MAX_VECTORS}, the tokens a prompt holds (got {value})"
            )
        return value

    @field_validator("learning_rate")
    @classmethod
    def _positive_float(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:  # the optimizer's default (None only while the optimizer is invalid)
            optimizer = info.data.get("optimizer")
            return DEFAULT_LEARNING_RATES[optimizer] if optimizer else None
        if not 0 < value <= MAX_LEARNING_RATE:
            raise ValueError(
                f"must be a positive number such as 5e-4, at most {MAX_LEARNING_RATE:g} "
                f"(got {value:g})"
            )
        return value

    @field_validator("snr_gamma", "max_embedding_norm")
    @classmethod
    def _positive_if_given(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(f"must be a positive number, such as 5 or 0.5 (got {value})")
        return value

    @field_validator("save_best")
    @classmethod
    def _best_needs_evaluation(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("eval_loss") is False:
            raise ValueError("needs the evaluation loss: drop --no-eval_loss")
        return value

    @field_validator("adam_beta1", "adam_beta2")
    @classmethod
    def _decay_rate(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"must be at least 0 and below 1, such as 0.9 (got {value})")
        return value

    @field_validator("adam_epsilon")
    @classmethod
    def _positive_epsilon(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"must be a small positive number such as 1e-8 (got {value})")
        return value

    @field_validator("adam_weight_decay")
    @classmethod
    def _non_negative_decay(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be zero or more, such as 1e-2 (got {value})")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= SEED_MAX:
            raise ValueError(
                f"must be a whole number from 0 to {SEED_MAX}, InvokeAI's seed range "
                f"(got {value})"
            )
        return value

    @field_validator("train_batch_size")
    @classmethod
    def _batch_fits_a_device(cls, value: int) -> int:
        if value > MAX_BATCH_SIZE:
            raise ValueError(
                f"must be at most {MAX_BATCH_SIZE} (got {value}); for a larger effective batch "
                "raise --gradient_accumulation_steps"
            )
        return value

    @field_validator("num_validation_images")
    @classmethod
    def _grid_fits_a_device(cls, value: int) -> int:
        if value > MAX_VALIDATION_IMAGES:
            raise ValueError(
                f"must be at most {MAX_VALIDATION_IMAGES} (got {value}): a grid is drawn in "
                "one batch"
            )
        return value

    @field_validator("lr_warmup_steps", "num_validation_images", "validation_steps")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be zero or more (got {value})")
        return value

    @field_validator("train_data_dir", mode="after")
    @classmethod
    def _data_dir_holds_images(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Default to ROOT/text-inversion-training-data/<trigger>, then check it has images."""
        folder = value or _per_trigger_folder(info, output=False)
        if folder is None:
            return None
        folder = folder.expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"folder {folder} does not exist; put 3-20 images of your subject there "
                "or pass --train_data_dir"
            )
        if not _holds_images(folder):
            inside = _sub_folders_with_images(folder)
            if inside:
                raise ValueError(
                    f"folder {folder} holds no PNG, JPEG or WebP images of its own, only in "
                    f"sub-folders, which are not searched; pass the one to train on, e.g. "
                    f"--train_data_dir {inside[0]}"
                )
            raise ValueError(
                f"folder {folder} holds no PNG, JPEG or WebP images; add 3-20 pictures "
                "of your subject"
            )
        return folder

    @field_validator("output_dir", mode="after")
    @classmethod
    def _default_output_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Default to ROOT/text-inversion-output/<trigger>, as the manual describes."""
        folder = value or _per_trigger_folder(info, output=True)
        if folder is None:
            return None
        root = info.data.get("root")
        if root is not None:
            _refuse_inside_embeddings(folder.expanduser(), Path(root).expanduser())
        return folder.expanduser()

    @property
    def trigger(self) -> str:
        return trigger_of(self.placeholder_token)

    @property
    def data_dir(self) -> Path:
        """The training-image folder, always set once validated."""
        assert self.train_data_dir is not None
        return self.train_data_dir

    @property
    def out_dir(self) -> Path:
        """The output folder, always set once validated."""
        assert self.output_dir is not None
        return self.output_dir


DATA_DIRNAME = "text-inversion-training-data"
OUTPUT_DIRNAME = "text-inversion-output"
EMBEDDINGS_DIRNAME = "embeddings"


def embeddings_folder(root: Path) -> Path:
    """ROOT/embeddings/, where InvokeAI users keep embeddings and where ours are stored."""
    return root / EMBEDDINGS_DIRNAME


def trigger_folders(root: Path, trigger: str) -> tuple[Path, Path]:
    """The manual's defaults: ROOT/text-inversion-training-data/<trigger> for the images and
    ROOT/text-inversion-output/<trigger> for the results."""
    return root / DATA_DIRNAME / trigger, root / OUTPUT_DIRNAME / trigger


def is_image_file(path: Path) -> bool:
    """A picture a run trains on (PNG, JPEG or WebP, by its suffix)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _holds_images(folder: Path) -> bool:
    """Pictures directly in `folder`: a run reads no sub-folders."""
    return any(is_image_file(p) for p in folder.iterdir())


def _sub_folders_with_images(folder: Path) -> list[Path]:
    """Where the pictures are when a dataset keeps them in sub-folders (kohya's 10_ball/)."""
    found = []
    for sub in sorted(folder.iterdir()):
        try:
            if sub.is_dir() and not sub.name.startswith(".") and _holds_images(sub):
                found.append(sub)
        except OSError:  # an unreadable sub-folder is no hint
            continue
    return found


def _per_trigger_folder(info: ValidationInfo, output: bool) -> Path | None:
    """The default data (or output) folder, or None while the token itself is invalid."""
    token = info.data.get("placeholder_token")
    root = info.data.get("root")
    if token is None or root is None:
        return None
    return trigger_folders(Path(root), trigger_of(token))[int(output)]


def _refuse_inside_embeddings(folder: Path, root: Path) -> None:
    """InvokeAI registers every embedding file under ROOT/embeddings/ when it starts, so a
    run's checkpoints there would become prompt words of their own."""
    embeddings = embeddings_folder(root).resolve()
    if folder.resolve().is_relative_to(embeddings):
        raise ValueError(
            f"{folder} is inside {embeddings}, where InvokeAI registers every embedding file it "
            "finds when it starts (a run's checkpoints too); choose a folder outside it, such as "
            "the default ROOT/text-inversion-output/<trigger>"
        )


def field_problems(error: ValidationError) -> dict[str, str]:
    """Each invalid option's first message, by option name ("" for the options as a whole)."""
    problems: dict[str, str] = {}
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        text = "required" if item["type"] == "missing" else item["msg"]
        problems.setdefault(field, text.removeprefix("Value error, "))
    return problems


def build_config(options: dict[str, Any]) -> TrainingConfig:
    """Validate options from any front end; every problem in one line, by option name."""
    try:
        return TrainingConfig(**options)
    except ValidationError as error:
        raise UserInputError.of_options(field_problems(error)) from error
