"""A run's surroundings: what is decided and checked before the loop starts (seed, precision,
attention, whether the folder may be trained in or resumed from) and what wraps it (the
accelerate session, the run's log file, TensorBoard, Ctrl-C). The loop itself is in
`training_run.py`, and `trainer.py` puts the two together."""

from __future__ import annotations

import importlib.util
import logging
import secrets
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import get_cpu_distributed_information

from ..config import TrainingConfig, xformers_installed
from ..errors import UserInputError
from .checkpoints import TrainingSnapshot, list_checkpoints
from .embedding_file import token_dimension_mismatch
from .model_files import ModelInfo, ModelParts, ModelSource
from .run_folder import RunFolder

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbelow(2**31)


def usable_mixed_precision(requested: str) -> str:
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 needs a CUDA GPU; training in full precision on this device")
        return "no"
    return requested


def source_precision(requested: str, source: ModelSource) -> str:
    """A model InvokeAI loads comes in the precision InvokeAI chose (its `precision` setting and
    device); the run follows it rather than convert the host's shared weights."""
    if source.dtype is None:
        return requested
    (chosen,) = [name for name, dtype in DTYPES.items() if dtype == source.dtype]
    if chosen != requested:
        logger.warning(
            "InvokeAI loads %s in %s (its precision setting); training with mixed precision "
            "%r instead of %r",
            source.info.label,
            str(source.dtype).removeprefix("torch."),
            chosen,
            requested,
        )
    return chosen


def require_exportable(info: ModelInfo, only_save_embeds: bool) -> None:
    """--no-only_save_embeds writes a diffusers pipeline, built from the model's folder."""
    if not only_save_embeds and info.folder is None:
        raise UserInputError(
            f"--no-only_save_embeds saves a diffusers pipeline, but {info.label} is a single-file "
            "checkpoint; keep --only_save_embeds (the default), or convert the model to "
            "diffusers in InvokeAI's model manager",
            option="only_save_embeds",
        )


@contextmanager
def accelerator_session(accelerator: Accelerator) -> Iterator[None]:
    """End the accelerate session cleanly so processes exit and the next run starts afresh.

    accelerate keeps its settings (mixed precision among them) in a process-wide singleton that
    refuses a second Accelerator with other ones; a form or server process trains many times, so
    the settings are dropped with the session (the process group, if any, stays).
    """
    try:
        yield
    finally:
        accelerator.end_training()
        accelerator.free_memory()
        AcceleratorState._reset_state()


def choose_attention(parts: ModelParts, want_xformers: bool) -> None:
    """xformers when asked and installed; otherwise torch's SDPA (diffusers' default)."""
    if not want_xformers:
        return
    if not xformers_installed():
        logger.warning("xformers is not installed; using torch's scaled-dot-product attention")
        return
    parts.unet.enable_xformers_memory_efficient_attention()


def refuse_to_clobber(folder: RunFolder) -> None:
    """A fresh run must not silently replace an earlier run's embedding or checkpoints."""
    if folder.embedding.exists() or list_checkpoints(folder.path):
        raise UserInputError(
            f"{folder.path} already holds an embedding or checkpoints from an earlier run; pass "
            "--resume_from_checkpoint latest to continue it, or --overwrite to start over",
            option="output_dir",
        )


def is_main_rank() -> bool:
    """The main process, known before accelerate starts: launchers (torchrun, accelerate
    launch, MPI) give every process its rank in the environment, as accelerate reads it."""
    return get_cpu_distributed_information().rank == 0


def clear_previous_run(folder: RunFolder) -> None:
    """A fresh run (allowed to overwrite) starts without the old run's checkpoints and log;
    only what our runs wrote is deleted."""
    folder.discard(
        *folder.owned_in(folder.checkpoints),
        folder.history,
        folder.tensorboard,
        folder.best_embedding,
    )


def check_resumable(snapshot: TrainingSnapshot, config: TrainingConfig, info: ModelInfo) -> None:
    facts = snapshot.facts
    optimizer = facts.get("optimizer", "adamw")  # checkpoints from before --optimizer: AdamW
    if optimizer != config.optimizer:
        raise UserInputError(
            f"the checkpoint was trained with --optimizer {optimizer}, not {config.optimizer}; "
            f"resume with --optimizer {optimizer}, or start over with --overwrite",
            option="resume_from_checkpoint",
        )
    if int(facts["token_dimension"]) != info.token_dim:
        raise token_dimension_mismatch(
            config.trigger, int(facts["token_dimension"]), info.token_dim
        )
    if (
        facts["placeholder_token"] != config.placeholder_token
        or int(facts["num_vectors"]) != config.num_vectors
    ):
        raise UserInputError(
            f"the checkpoint trains {facts['placeholder_token']} with {facts['num_vectors']} "
            f"vector(s), not {config.placeholder_token} with {config.num_vectors}; resume with "
            "the same token and --num_vectors, or use another --output_dir",
            option="resume_from_checkpoint",
        )


@contextmanager
def run_logging(folder: RunFolder, accelerator: Accelerator) -> Iterator[None]:
    """The run's log beside its outputs (main process) and one voice on the terminal (the other
    processes report only warnings). Both end with the run: a form or server process trains many
    times, and each run's train.log holds that run alone."""
    package_logger = logging.getLogger("invokeai_ti_plugin")
    level = package_logger.level
    handler: logging.Handler | None = None
    if accelerator.is_main_process:
        folder.train_log.parent.mkdir(parents=True, exist_ok=True)
        handler = RunLogFile(folder.train_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        package_logger.addHandler(handler)
        if level == logging.NOTSET or level > logging.INFO:
            package_logger.setLevel(logging.INFO)
    else:
        package_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if handler is not None:
            package_logger.removeHandler(handler)
            handler.close()
        package_logger.setLevel(level)


class RunLogFile(logging.FileHandler):
    """train.log. A write the file system refuses (a full disk) silences it instead of printing
    Python's logging traceback for every line: the run's next write of its own outputs stops it
    with one line that says what happened. Other faults are reported as logging does."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8")
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            self.failed = True
        else:
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the lines still buffered met the same full disk
            self.failed = True


def tracker(config: TrainingConfig) -> str | None:
    """accelerate's TensorBoard tracker, when asked for and usable. Its writer is imported here,
    before the model loads: accelerate imports it only at the first step, where a broken
    install (tensorboard 2.21 needs protobuf 6, InvokeAI holds protobuf 4, and uv installs the
    pair all the same) ended the run with a traceback."""
    if config.report_to == "none":
        return None
    if importlib.util.find_spec("tensorboard") is None:
        logger.warning("tensorboard is not installed; logging to logs/history.jsonl only")
        return None
    try:
        import torch.utils.tensorboard  # noqa: F401  (what accelerate's tracker writes with)
    except Exception as error:  # a broken install fails its own way: ImportError, TypeError...
        logger.warning(
            "tensorboard is installed but does not load (%s: %s); logging to "
            "logs/history.jsonl only. Install a tensorboard that fits this environment's "
            "protobuf (for InvokeAI's protobuf 4: pip install \"tensorboard<2.21\")",
            type(error).__name__,
            error,
        )
        return None
    return config.report_to


@contextmanager
def stop_on_interrupt(
    request_stop: Callable[[], None], stop_requested: Callable[[], bool]
) -> Iterator[None]:
    """First Ctrl-C: finish the update, save, stop. Second Ctrl-C: stop at once."""
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread: the caller stops us with request_stop
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop_requested():
            raise KeyboardInterrupt
        request_stop()
        logger.warning("stopping after this step; saving a checkpoint (Ctrl-C again to abort)")

    try:
        signal.signal(signal.SIGINT, handle)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
