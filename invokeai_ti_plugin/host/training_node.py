"""The "Train Textual Inversion" node of InvokeAI's workflow editor.

Registered by the plugin's `register_nodes()` when `invokeai-web` imports the node pack. Its
inputs mirror `TrainingConfig` (same names, defaults, limits and help text), and it trains
through the same job as the command line, inside the server with the server's own services:
bad input fails the queue item with the command line's one-line message, Cancel stops after the
current step with a checkpoint, and the registered `<trigger>` works in the next generation.
"""

import time
from pathlib import Path
from typing import Any

from invokeai.app.api.dependencies import ApiDependencies
from invokeai.app.invocations.baseinvocation import (
    BaseInvocation,
    BaseInvocationOutput,
    invocation,
    invocation_output,
)
from invokeai.app.invocations.fields import (
    BoardField,
    FieldKind,
    ImageField,
    Input,
    InputField,
    InputFieldJSONSchemaExtra,
    OutputField,
    UIComponent,
)
from invokeai.app.invocations.model import ModelIdentifierField
from invokeai.app.services.invocation_services import InvocationServices
from invokeai.app.services.session_processor.session_processor_common import CanceledException
from invokeai.app.services.shared.invocation_context import InvocationContext
from invokeai.backend.model_manager.taxonomy import BaseModelType, ModelType
from PIL import Image
from pydantic import Field

from ..config import (
    MAX_BATCH_SIZE,
    MAX_RESOLUTION,
    MAX_VALIDATION_IMAGES,
    MAX_VECTORS,
    SEED_MAX,
    LearnableProperty,
    LrScheduler,
    OptimizerName,
    TorchCompile,
    TrainingConfig,
    build_config,
    name_problem,
    trigger_of,
)
from ..console import progress_line
from ..errors import UserInputError
from ..job import run_job
from ..training.model_files import ModelSource
from ..training.reports import ProgressUpdate
from ..training.run_folder import RunFolder
from ..training.samples import runs_last_grid
from ..training.trainer import Trainer
from .board_images import export_board
from .embeddings import embedding_records
from .model_db import HostModels
from .model_loading import host_model_source

PROGRESS_INTERVAL = 0.5  # seconds between progress events: a fast run would flood the socket
PREVIEW_SIZE = 256  # the sample grid shown with the progress, at most this many pixels a side


def _option(name: str, **limits: Any) -> Any:
    """An input mirroring the config field `name`: its default and help text, and limits."""
    field = TrainingConfig.model_fields[name]
    if field.is_required():
        return InputField(description=field.description, **limits)
    return InputField(
        default=field.get_default(call_default_factory=True),
        description=field.description,
        **limits,
    )


@invocation_output("train_textual_inversion_output")
class TrainTextualInversionOutput(BaseInvocationOutput):
    embedding: ModelIdentifierField = OutputField(
        description="The trained embedding, registered with InvokeAI"
    )
    trigger: str = OutputField(description="The word to use in prompts, e.g. <psychedelic>")
    samples: ImageField | None = OutputField(
        default=None,
        description="The last sample grid, also in the gallery (none with num_validation_images 0)",
    )
    loss_plot: ImageField | None = OutputField(
        default=None,
        description="The loss and learning rate over the run (the run folder's loss.png), also "
        "in the gallery",
    )


@invocation(
    "train_textual_inversion",
    title="Train Textual Inversion",
    tags=["training", "textual inversion", "embedding"],
    category="training",
    version="1.5.0",
    use_cache=False,
)
class TrainTextualInversionInvocation(BaseInvocation):
    """Teach a Stable Diffusion 1.x, 2.x or SDXL model a new word from 3-20 pictures (a board,
    or a folder on the server). The embedding is registered, and <trigger> works in the next
    prompt. Training holds the queue: nothing else runs until it ends or is canceled. Cancel
    saves a checkpoint; run again with resume on to continue from it."""

    model: ModelIdentifierField = InputField(
        description=TrainingConfig.model_fields["model"].description,
        ui_model_type=ModelType.Main,
        ui_model_base=[
            BaseModelType.StableDiffusion1,
            BaseModelType.StableDiffusion2,
            BaseModelType.StableDiffusionXL,
        ],
    )
    placeholder_token: str = _option("placeholder_token")
    initializer_token: str = _option("initializer_token")
    num_vectors: int = _option("num_vectors", ge=1, le=MAX_VECTORS)
    learnable_property: LearnableProperty = _option("learnable_property")
    # `board` is a name the host reserves for its own board input (WithBoard): declared the way
    # it declares it, with what the board means here
    board: BoardField | None = Field(
        default=None,
        description="The board whose images are the training set (Auto: the auto-add board). "
        "Not used when train_data_dir is given.",
        json_schema_extra=InputFieldJSONSchemaExtra(
            field_kind=FieldKind.Internal, input=Input.Direct, orig_required=False
        ).model_dump(exclude_none=True),
    )
    train_data_dir: str = InputField(
        default="",
        description="Instead of the board: a folder on the server holding 3-20 images "
        "(relative to the InvokeAI root unless absolute).",
    )
    max_train_steps: int = _option("max_train_steps", ge=1)
    optimizer: OptimizerName = _option("optimizer")
    # not optional here: the editor draws no input box for a field that may be empty, so 0
    # stands for "the optimizer's". No lower limit either: the editor marks any rate below its
    # step (0.1) invalid when given one; the config refuses less than 0
    learning_rate: float = InputField(
        default=0.0,
        description=f"{TrainingConfig.model_fields['learning_rate'].description} 0: that default.",
    )
    scale_lr: bool = _option("scale_lr", title="Scale LR")
    lr_scheduler: LrScheduler = _option("lr_scheduler", title="LR Scheduler")
    lr_warmup_steps: int = _option("lr_warmup_steps", ge=0, title="LR Warmup Steps")
    # 0 is off: like learning_rate (above), neither may be empty nor have a lower limit
    snr_gamma: float = InputField(
        default=0.0,
        description=f"{TrainingConfig.model_fields['snr_gamma'].description} 0: off.",
        title="Min-SNR Gamma",
    )
    max_embedding_norm: float = InputField(
        default=0.0,
        description=f"{TrainingConfig.model_fields['max_embedding_norm'].description} 0: none.",
    )
    train_batch_size: int = _option("train_batch_size", ge=1, le=MAX_BATCH_SIZE)
    gradient_accumulation_steps: int = _option("gradient_accumulation_steps", ge=1)
    torch_compile: TorchCompile = _option("torch_compile")
    validation_steps: int = _option("validation_steps", ge=0)
    num_validation_images: int = _option("num_validation_images", ge=0, le=MAX_VALIDATION_IMAGES)
    eval_loss: bool = _option("eval_loss")
    save_best: bool = _option("save_best")
    # a string, not optional, for the same reason as learning_rate: empty stands for the default
    validation_prompt: str = InputField(
        default="",
        description=f"{TrainingConfig.model_fields['validation_prompt'].description} Empty: "
        "that default.",
        ui_component=UIComponent.Textarea,
    )
    resolution: int = InputField(
        default=0,
        ge=0,
        le=MAX_RESOLUTION,
        multiple_of=8,
        description=f"{TrainingConfig.model_fields['resolution'].description} 0: that default.",
    )
    center_crop: bool = _option("center_crop")
    seed: int = InputField(
        default=0,
        ge=0,
        le=SEED_MAX,
        description="Random seed: the same seed, pictures and settings train the same "
        "embedding. A resumed run keeps the seed it started with.",
    )
    resume: bool = InputField(
        default=True,
        description="Continue from the newest checkpoint of an earlier run of this trigger (a "
        "canceled one, or a finished one given more steps). Off: start over, replacing that "
        "run's checkpoints and embedding.",
    )

    def invoke(self, context: InvocationContext) -> TrainTextualInversionOutput:
        services = ApiDependencies.invoker.services
        trigger = trigger_of(self.placeholder_token)
        _require_administrator(context, services)
        models = HostModels.of_server(services)
        # a trigger that cannot name a folder is the config's to report, before any export
        data_dir = None if name_problem(trigger) else self._training_folder(context, models.root)
        config = self.training_config(models.root, data_dir)
        replaced = [r.key for r in embedding_records(models) if r.name == config.trigger]
        progress = _QueueProgress(context, config)
        context.util.signal_progress(f"Preparing to train {config.placeholder_token}")
        source = _model_source(context, self.model)
        outcome = run_job(config, progress, progress.started, models, source)
        if progress.canceled:
            raise CanceledException()
        if outcome.registered is None:
            raise UserInputError(outcome.note)
        _forget_cached(services, [*replaced, outcome.registered.key])
        record = models.store.get_model(outcome.registered.key)
        return TrainTextualInversionOutput(
            embedding=ModelIdentifierField.from_config(record),
            trigger=f"<{outcome.registered.name}>",
            samples=_gallery_copy(
                context, runs_last_grid(config.out_dir, config.num_validation_images)
            ),
            loss_plot=_gallery_copy(context, RunFolder(config.out_dir).loss_plot),
        )

    def training_config(self, root: Path, data_dir: Path | None) -> TrainingConfig:
        """The inputs as the options the command line would take (and checks the same way)."""
        return build_config(
            {
                "model": self.model.key,
                "placeholder_token": self.placeholder_token,
                "initializer_token": self.initializer_token,
                "num_vectors": self.num_vectors,
                "learnable_property": self.learnable_property,
                "root": root,
                "train_data_dir": data_dir,
                "max_train_steps": self.max_train_steps,
                "optimizer": self.optimizer,
                "learning_rate": self.learning_rate or None,
                "scale_lr": self.scale_lr,
                "lr_scheduler": self.lr_scheduler,
                "lr_warmup_steps": self.lr_warmup_steps,
                "snr_gamma": self.snr_gamma or None,
                "max_embedding_norm": self.max_embedding_norm or None,
                "train_batch_size": self.train_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "torch_compile": self.torch_compile,
                "validation_steps": self.validation_steps,
                "num_validation_images": self.num_validation_images,
                "eval_loss": self.eval_loss,
                "save_best": self.save_best,
                "validation_prompt": self.validation_prompt.strip() or None,
                "resolution": self.resolution or None,
                "center_crop": self.center_crop,
                "seed": self.seed,
                "resume_from_checkpoint": "latest" if self.resume else None,
                "overwrite": not self.resume,
            }
        )

    def _training_folder(self, context: InvocationContext, root: Path) -> Path:
        """The folder given, else the board's images exported to a folder of ours. A typed
        folder wins: the editor fills a Board left on Auto with the auto-add board, which the
        user never chose for training."""
        folder = self.train_data_dir.strip()
        if folder:
            if self.board is not None:
                context.logger.info(f"training on {folder}; the board input is not used")
            return root / Path(folder).expanduser()
        if self.board is None:
            raise UserInputError(
                "choose the board whose pictures to train on (or give a train_data_dir)",
                option="board",
            )
        board_id = self.board.board_id
        names = context.boards.get_all_image_names_for_board(board_id)
        return export_board(
            root,
            trigger_of(self.placeholder_token),
            context.boards.get_dto(board_id).board_name,
            {name: context.images.get_path(name) for name in names},
        )


def _require_administrator(context: InvocationContext, services: InvocationServices) -> None:
    """In multiuser mode InvokeAI lets only administrators add or replace models. Training
    registers an embedding, replaces an earlier run (and embedding) of its trigger and reads
    folders on the server, so it is theirs alone too: a user's node stops before it writes or
    reads anything. The queue item's user is read as the host's own nodes read it."""
    if not services.configuration.multiuser:
        return
    user = services.users.get(context._data.queue_item.user_id)
    if user is None or not (user.is_active and user.is_admin):
        raise UserInputError(
            "training adds an embedding to InvokeAI's models, which in multiuser mode only an "
            "administrator may do; ask an administrator to train it"
        )


def _gallery_copy(context: InvocationContext, picture: Path | None) -> ImageField | None:
    """A picture of the run (its last sample grid, its loss plot) saved to the gallery, where
    the user looks for pictures. Never to the training board (the node is no `WithBoard`),
    where it would join the next run's training set. None for no picture: a run that drew no
    samples has none (an older grid in the folder is not this run's)."""
    if picture is None or not picture.is_file():
        return None
    with Image.open(picture) as image:
        saved = context.images.save(image=image.convert("RGB"))
    return ImageField(image_name=saved.image_name)


def _model_source(context: InvocationContext, model: ModelIdentifierField) -> ModelSource:
    """The model to train, from the server's own model manager and cache: training shares the
    parts the server holds instead of loading a second copy (see `host/model_loading.py`)."""
    record = context.models.get_config(model)
    return host_model_source(
        record, lambda submodel: context.models.load(model, submodel_type=submodel)
    )


class _QueueProgress:
    """The queue item's progress (step, loss, time left, the latest sample grid), and its
    Cancel button, which stops the trainer after the current step."""

    def __init__(self, context: InvocationContext, config: TrainingConfig) -> None:
        self.context = context
        self.output_dir = config.out_dir
        self.token = config.placeholder_token
        self.trainer: Trainer | None = None
        self.canceled = False
        self._last_signal = 0.0
        self._preview: tuple[Path, Image.Image] | None = None

    def started(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, update: ProgressUpdate) -> None:
        if self.context.util.is_canceled() and self.trainer is not None:
            self.canceled = True
            self.trainer.request_stop()
        now = time.monotonic()
        if now - self._last_signal < PROGRESS_INTERVAL and update.step < update.total_steps:
            return
        self._last_signal = now
        self.context.util.signal_progress(
            f"Training {self.token}: {progress_line(update)}",
            update.step / update.total_steps,
            self._latest_grid(),
        )

    def _latest_grid(self) -> Image.Image | None:
        """The newest sample grid, read again only when a new one appears."""
        grid = RunFolder(self.output_dir).newest_sample()
        if grid is None:
            return None
        if self._preview is None or self._preview[0] != grid:
            with Image.open(grid) as image:
                preview = image.convert("RGB")
            preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
            self._preview = (grid, preview)
        return self._preview[1]


def _forget_cached(services: InvocationServices, keys: list[str]) -> None:
    """Drop what the server cached of a replaced embedding (its vectors, by model key) and the
    prompt results computed with them, so `<trigger>` has its new meaning at once."""
    for cache in services.model_manager.load.ram_caches.values():
        for key in keys:
            cache.drop_model(key)
    services.invocation_cache.clear()
