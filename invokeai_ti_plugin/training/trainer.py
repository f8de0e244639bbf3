"""A textual-inversion training, on HF Accelerate: what a front end starts.

One process trains on one device; `accelerate launch` of the same command runs it data-parallel
over GPUs or machines. `Trainer` checks and prepares the run (`run_setup.py`: folder, resume
point, images, model, precision, seed), then hands it to the loop (`training_run.py`).
"""

from __future__ import annotations

import logging
from contextlib import closing
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from ..config import TrainingConfig
from .checkpoints import check_same_images, image_fingerprints, resume_point
from .compiled_unet import compiled_training
from .images import load_training_images
from .model_files import FolderModelSource, ModelSource, require_trainable
from .new_tokens import add_placeholder_tokens, initializer_vectors
from .out_of_memory import out_of_memory_explained
from .reports import ProgressCallback, TrainingResult
from .run_folder import RunFolder
from .run_setup import (
    DTYPES,
    accelerator_session,
    check_resumable,
    choose_seed,
    clear_previous_run,
    is_main_rank,
    refuse_to_clobber,
    require_exportable,
    run_logging,
    source_precision,
    stop_on_interrupt,
    tracker,
    usable_mixed_precision,
)
from .training_run import TrainingRun

logger = logging.getLogger(__name__)


class Trainer:
    """Runs one training; `request_stop` (also bound to Ctrl-C once training has begun) ends it
    after the current update with a checkpoint and the embedding so far."""

    def __init__(
        self,
        config: TrainingConfig,
        on_progress: ProgressCallback | None = None,
        model_source: ModelSource | None = None,  # None: the diffusers folder config.model
    ) -> None:
        self.config = config
        self.on_progress = on_progress
        self.model_source = model_source
        self._stop_requested = False

    def request_stop(self) -> None:
        self._stop_requested = True

    def run(self) -> TrainingResult:
        with RunFolder(self.config.out_dir) as folder:
            source = self.model_source or FolderModelSource(Path(self.config.model).expanduser())
            with closing(source):
                return self._run(folder, source)

    def _run(self, folder: RunFolder, source: ModelSource) -> TrainingResult:
        config = self.config
        info = source.info
        require_trainable(info)
        require_exportable(info, config.only_save_embeds)
        resolution = config.resolution or info.native_resolution
        out = config.out_dir
        main_process = is_main_rank()
        if main_process:  # the main process speaks for the folder; the others trust it
            folder.check_usable(config.overwrite)
        resume = resume_point(out, config.resume_from_checkpoint)
        if config.resume_from_checkpoint == "latest" and resume is None:
            logger.info("no checkpoint in %s yet: starting a new run", out)
        snapshot = resume.snapshot if resume else None
        if snapshot is not None:
            check_resumable(snapshot, config, info)
        if snapshot is None and not config.overwrite:
            refuse_to_clobber(folder)
        images = load_training_images(
            config.data_dir, resolution, config.center_crop, leave_out=[folder.loss_plot]
        )
        image_record = image_fingerprints(images)
        if resume is not None:
            check_same_images(resume, image_record, config.data_dir)
        mixed_precision = source_precision(usable_mixed_precision(config.mixed_precision), source)
        logger.info("loading %s (%s)", info.label, info.base)
        parts = source.load_parts(DTYPES[mixed_precision])
        new_words = [
            (
                add_placeholder_tokens(tokenizer, config.placeholder_token, config.num_vectors),
                initializer_vectors(
                    tokenizer, encoder, config.initializer_token, config.num_vectors
                ),
            )
            for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True)
        ]
        seed = int(snapshot.facts["seed"]) if snapshot else choose_seed(config.seed)
        if main_process:
            folder.claim(config.overwrite)

        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=mixed_precision,
            project_config=ProjectConfiguration(
                project_dir=str(out), logging_dir=str(folder.tensorboard.parent)
            ),
            log_with=tracker(config),
            # without a GPU, several processes (torchrun, accelerate launch) use gloo on CPU
            cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        )
        run: TrainingRun | None = None

        def moment() -> str:
            return "before the first step" if run is None else f"at step {run.step + 1}"

        with (
            accelerator_session(accelerator),
            run_logging(folder, accelerator),
            out_of_memory_explained(config, resolution, parts.unet, moment),
        ):
            run = TrainingRun(
                config,
                folder,
                accelerator,
                parts,
                new_words,
                images,
                image_record,
                resolution,
                seed,
                self.on_progress,
                lambda: self._stop_requested,
            )
            if resume is not None:
                run.restore(resume)
            elif accelerator.is_main_process:
                clear_previous_run(folder)
            # only now is there work to save; Ctrl-C while starting up aborts with nothing written
            with (
                compiled_training(config.torch_compile),
                stop_on_interrupt(self.request_stop, lambda: self._stop_requested),
            ):
                return run.train()
