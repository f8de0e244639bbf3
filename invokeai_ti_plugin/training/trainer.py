"""The textual-inversion training run, on HF Accelerate.

One process trains on one device; `accelerate launch` of the same command runs it data-parallel
over GPUs or machines. Only the new word's vectors are trained; the model is frozen, runs in the
chosen precision, and the VAE encodes each image once, the first time a batch needs it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import get_cpu_distributed_information
from diffusers.optimization import get_scheduler

from ..atomic_files import disk_full_explained, write_atomically, write_json_atomically
from ..config import TrainingConfig, xformers_installed
from ..errors import UserInputError
from .checkpoints import (
    ResumePoint,
    TrainingSnapshot,
    begin_checkpoint,
    check_same_images,
    finish_checkpoint,
    image_fingerprints,
    list_checkpoints,
    resume_point,
    save_process_state,
)
from .embedding_file import (
    EMBEDDING_KEY,
    SDXL_KEYS,
    EmbeddingVectors,
    read_embedding_vectors,
    save_vectors,
    token_dimension_mismatch,
)
from .evaluation import EvaluationRecord, FixedEvaluation, fixed_examples
from .examples import ExampleSampler
from .images import TrainingImage, load_training_images
from .latent_cache import LatentCache
from .loss_plot import write_loss_plot
from .memory_plan import free_gpu_bytes, plan_memory
from .model_files import (
    FolderModelSource,
    ModelInfo,
    ModelParts,
    ModelSource,
    require_trainable,
)
from .new_tokens import (
    PlaceholderEmbedding,
    add_placeholder_tokens,
    initializer_vectors,
    install_placeholder_embedding,
    placeholder_tokens,
)
from .objective import denoising_loss
from .optimizers import build_optimizer, limit_norms, scaled_learning_rate
from .prompts import caption_prompt, training_prompts, validation_prompt
from .run_folder import RunFolder
from .samples import render_samples, save_grid
from .text_conditioning import TextConditioning, sdxl_time_ids

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ProgressUpdate:
    """Sent after every update, on the main process."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    seconds_per_step: float

    @property
    def seconds_left(self) -> float:
        return (self.total_steps - self.step) * self.seconds_per_step


@dataclass(frozen=True)
class TrainingResult:
    embedding_path: Path
    summary_path: Path
    steps: int
    completed: bool
    checkpoint: Path
    model: ModelInfo
    trigger: str
    main_process: bool = True  # False in the other processes of a multi-process run


ProgressCallback = Callable[[ProgressUpdate], None]


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
        self.model_parts: ModelParts | None = None  # the last run's (frozen) model, to inspect

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
        _require_exportable(info, config.only_save_embeds)
        resolution = config.resolution or info.native_resolution
        out = config.out_dir
        main_process = _is_main_rank()
        if main_process:  # the main process speaks for the folder; the others trust it
            folder.check_usable(config.overwrite)
        resume = resume_point(out, config.resume_from_checkpoint)
        if config.resume_from_checkpoint == "latest" and resume is None:
            logger.info("no checkpoint in %s yet: starting a new run", out)
        snapshot = resume.snapshot if resume else None
        if snapshot is not None:
            _check_resumable(snapshot, config, info)
        if snapshot is None and not config.overwrite:
            _refuse_to_clobber(folder)
        images = load_training_images(
            config.data_dir, resolution, config.center_crop, leave_out=[folder.loss_plot]
        )
        image_record = image_fingerprints(images)
        if resume is not None:
            check_same_images(resume, image_record, config.data_dir)
        mixed_precision = _source_precision(_usable_mixed_precision(config.mixed_precision), source)
        logger.info("loading %s (%s)", info.label, info.base)
        parts = source.load_parts(_DTYPES[mixed_precision])
        self.model_parts = parts
        new_words = [
            (
                add_placeholder_tokens(tokenizer, config.placeholder_token, config.num_vectors),
                initializer_vectors(
                    tokenizer, encoder, config.initializer_token, config.num_vectors
                ),
            )
            for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True)
        ]
        seed = int(snapshot.facts["seed"]) if snapshot else _choose_seed(config.seed)
        if main_process:
            folder.claim(config.overwrite)

        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=mixed_precision,
            project_dir=str(out),
            log_with=_tracker(config),
            # without a GPU, several processes (torchrun, accelerate launch) use gloo on CPU
            cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        )
        with _accelerator_session(accelerator), _run_logging(folder, accelerator):
            run = _Run(
                self, folder, accelerator, parts, new_words, images, image_record, resolution, seed
            )
            if resume is not None:
                run.restore(resume)
            elif accelerator.is_main_process:
                _clear_previous_run(folder)
            # only now is there work to save; Ctrl-C while starting up aborts with nothing written
            with _stop_on_interrupt(self):
                return run.train()


class _Run:
    """The state of one training run on one process."""

    def __init__(
        self,
        trainer: Trainer,
        folder: RunFolder,
        accelerator: Accelerator,
        parts: ModelParts,
        new_words: list[tuple[list[int], torch.Tensor]],
        images: list[TrainingImage],
        image_record: dict[str, str],  # what checkpoints record of the images (a resume checks)
        resolution: int,
        seed: int,
    ) -> None:
        self.trainer = trainer
        self.config = config = trainer.config
        self.folder = folder
        self.accelerator = accelerator
        self.parts = parts
        self.seed = seed
        self.resolution = resolution
        self.image_record = image_record
        self.step = 0
        self.resumed: ResumePoint | None = None
        device = accelerator.device
        _choose_attention(parts, config.enable_xformers_memory_efficient_attention)

        logger.info("%d images at %d px, each encoded once (and mirrored)", len(images), resolution)
        self.latents = LatentCache(
            parts.vae_loader().to(device),
            torch.stack([image.pixels for image in images]),
            with_flips=True,
        )
        parts.unet.to(device)
        self.placeholders: list[PlaceholderEmbedding] = []
        for encoder, (token_ids, start) in zip(parts.text_encoders, new_words, strict=True):
            encoder.to(device)
            self.placeholders.append(install_placeholder_embedding(encoder, token_ids, start))
        memory = plan_memory(
            config.gradient_checkpointing,
            free_gpu_bytes(device),
            parts.info.base,
            resolution,
            config.train_batch_size,
            parts.dtype,
        )
        if memory.gradient_checkpointing:
            logger.info("gradient checkpointing on: %s", memory.reason)
            parts.unet.enable_gradient_checkpointing()

        self.token_text = " ".join(placeholder_tokens(config.placeholder_token, config.num_vectors))
        templates = training_prompts(self.token_text, config.learnable_property)
        captioned = [index for index, image in enumerate(images) if image.caption]
        captions = [
            caption_prompt(images[index].caption or "", config.placeholder_token, self.token_text)
            for index in captioned
        ]
        # each image's own prompt row after the templates, or -1: draw a template
        self.caption_row = torch.full((len(images),), -1, dtype=torch.long)
        self.caption_row[captioned] = torch.arange(len(captions)) + len(templates)
        self.time_ids = sdxl_time_ids(images, resolution).to(device)

        self.generator = torch.Generator().manual_seed(seed + accelerator.process_index)
        self.sampler = ExampleSampler(
            len(images), len(templates), flip=True, generator=self.generator
        )

        self.learning_rate = scaled_learning_rate(config, accelerator.num_processes)
        optimizer = build_optimizer(
            config, [placeholder.vectors for placeholder in self.placeholders], self.learning_rate
        )
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        *encoders, self.optimizer = accelerator.prepare(*parts.text_encoders, optimizer)
        self.conditioning = TextConditioning(
            parts.tokenizers, encoders, templates + captions, device
        )
        logger.info(
            "initial vector norms: %s",
            ", ".join(f"{norm:.3f}" for p in self.placeholders for norm in p.vectors.norm(dim=-1)),
        )
        self.record = EvaluationRecord()  # kept up to date on the main process
        self.evaluation: FixedEvaluation | None = None
        if config.eval_loss and accelerator.is_main_process:
            self.evaluation = FixedEvaluation(
                fixed_examples(
                    self.caption_row,
                    len(templates),
                    parts.noise_scheduler.config.num_train_timesteps,
                ),
                self.latents,
                TextConditioning(
                    parts.tokenizers,
                    [accelerator.unwrap_model(e) for e in encoders],
                    templates + captions,
                    device,
                ),
                self.time_ids,
                parts.unet,
                parts.noise_scheduler,
                config.train_batch_size,
                device,
            )
        self.history = _History(folder, accelerator)
        self.tracking = bool(accelerator.log_with)
        if self.tracking:
            accelerator.init_trackers("textual_inversion")

    @property
    def vector_keys(self) -> tuple[str, ...]:
        return SDXL_KEYS if self.parts.info.is_sdxl else (EMBEDDING_KEY,)

    def learned_vectors(self) -> EmbeddingVectors:
        return EmbeddingVectors(
            {
                key: placeholder.vectors
                for key, placeholder in zip(self.vector_keys, self.placeholders, strict=True)
            }
        )

    def restore(self, point: ResumePoint) -> None:
        """Continue from a checkpoint exactly as if the run had never stopped."""
        snapshot = point.snapshot
        try:
            with torch.no_grad():
                for key, placeholder in zip(self.vector_keys, self.placeholders, strict=True):
                    placeholder.vectors.copy_(snapshot.vectors[key].to(placeholder.vectors.device))
            self.optimizer.load_state_dict(snapshot.optimizer)
            self.lr_scheduler.load_state_dict(snapshot.lr_scheduler)
            self._continue_at_learning_rate()
            if "evaluation" in snapshot.facts:
                self.record.load_state_dict(snapshot.facts["evaluation"], snapshot.best_vectors)
        except (LookupError, TypeError, ValueError, RuntimeError, ArithmeticError) as error:
            raise UserInputError(  # files that load but do not fit together: damaged or forged
                f"cannot resume from {point.folder}: its state does not fit this run ({error}); "
                "pass another checkpoint, or start over with --overwrite",
                option="resume_from_checkpoint",
            ) from error
        self.sampler.load_state_dict(point.process_state(self.accelerator.process_index))
        self.step = snapshot.step
        self.resumed = point
        self.history.truncate(self.step)
        self._save_best()  # the best file on disk may be from beyond this checkpoint
        logger.info("resuming from %s at step %d", point.folder, self.step)

    def _continue_at_learning_rate(self) -> None:
        """A resumed run uses the --learning_rate it is given now (say, a lower one after a
        divergence) on the restored schedule; the same rate changes nothing, bit for bit."""
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] *= self.learning_rate / self.lr_scheduler.base_lrs[index]
            self.lr_scheduler.base_lrs[index] = self.learning_rate

    def train(self) -> TrainingResult:
        config = self.config
        accelerator = self.accelerator
        logger.info(
            "training %s for %d steps (batch %d x %d accumulation x %d processes)",
            config.placeholder_token,
            config.max_train_steps,
            config.train_batch_size,
            config.gradient_accumulation_steps,
            accelerator.num_processes,
        )
        seconds_per_step = 0.0
        last = time.perf_counter()
        stopped = False
        if self.resumed is None:
            self._evaluate()
        while self.step < config.max_train_steps:
            loss_sum = torch.zeros((), device=accelerator.device)
            for _ in range(config.gradient_accumulation_steps):
                # no autocast: the frozen parts already run in the chosen precision; autocast
                # only added fp32 up-casts of norms and softmax (SDXL at 1024 px: +1.2 GiB peak)
                with accelerator.accumulate(*self.conditioning.text_encoders):
                    loss = self._loss_of_next_batch()
                    accelerator.backward(loss)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
            if config.max_embedding_norm is not None:
                limit_norms([p.vectors for p in self.placeholders], config.max_embedding_norm)
            if not self.optimizer.step_was_skipped:
                self.lr_scheduler.step()
            self.step += 1
            reduced = accelerator.reduce(loss_sum, "mean")
            loss_value = float(reduced) / config.gradient_accumulation_steps
            self._stop_if_diverged(loss_value)
            now = time.perf_counter()
            elapsed, last = now - last, now
            seconds_per_step = (
                elapsed if seconds_per_step == 0 else 0.9 * seconds_per_step + 0.1 * elapsed
            )
            learning_rate = float(self.lr_scheduler.get_last_lr()[0])
            self.history.add(self.step, loss_value, learning_rate, self._evaluate_if_due())
            if self.tracking:
                accelerator.log({"loss": loss_value, "lr": learning_rate}, step=self.step)
            if accelerator.is_main_process and self.trainer.on_progress:
                self.trainer.on_progress(
                    ProgressUpdate(
                        self.step,
                        config.max_train_steps,
                        loss_value,
                        learning_rate,
                        seconds_per_step,
                    )
                )
            if self._stop_is_requested():
                stopped = True
                break
            if self.step < config.max_train_steps:
                if self.step % config.checkpointing_steps == 0:
                    self.save_checkpoint()
                if config.validation_steps and self.step % config.validation_steps == 0:
                    self.save_samples()
            last = time.perf_counter()  # saving is not training time
        if self.resumed is not None and self.resumed.snapshot.step == self.step:
            checkpoint = self.resumed.folder  # nothing new: rewriting it would only risk it
        else:
            checkpoint = self.save_checkpoint()
        self.save_samples()
        return self._finish(completed=not stopped, checkpoint=checkpoint)

    def _stop_if_diverged(self, loss: float) -> None:
        """A loss or vector that is no longer finite never recovers: stop before anything of it
        is saved, so the checkpoints and the embedding on disk stay the last good ones."""
        vectors = self.learned_vectors().tensors.values()
        if math.isfinite(loss) and all(bool(torch.isfinite(v).all()) for v in vectors):
            return
        what = f"the loss became {loss}" if not math.isfinite(loss) else "the vectors overflowed"
        found = list_checkpoints(self.config.out_dir)
        resume = (
            f"; add --resume_from_checkpoint latest to continue from the last checkpoint before "
            f"it, {found[-1]}"
            if found
            else " (no checkpoint was saved before it)"
        )
        raise UserInputError(
            f"training diverged at step {self.step}: {what}, and nothing of it was saved; run "
            f"again with a lower --learning_rate (this run used {self.config.learning_rate:g})"
            f"{resume}",
            option="learning_rate",
        )

    def _loss_of_next_batch(self) -> torch.Tensor:
        batch = self.sampler.next_batch(self.config.train_batch_size)
        device = self.accelerator.device
        latents = self.latents.sample(batch.image_index, batch.flipped, self.generator).to(device)
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        num_timesteps = self.parts.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (len(latents),), generator=self.generator)
        captioned = self.caption_row[batch.image_index]
        rows = torch.where(captioned >= 0, captioned, batch.prompt_index)
        hidden, added = self.conditioning.encode(rows, self.time_ids[batch.image_index.to(device)])
        return denoising_loss(
            self.parts.unet,
            self.parts.noise_scheduler,
            latents,
            hidden,
            noise,
            timesteps.to(device),
            added,
            snr_gamma=self.config.snr_gamma,
        )

    def _evaluate_if_due(self) -> float | None:
        """Every --validation_steps and at the last step, as the sample grids."""
        every = self.config.validation_steps
        due = self.step == self.config.max_train_steps or (every and self.step % every == 0)
        return self._evaluate() if due else None

    def _evaluate(self) -> float | None:
        """The fixed-noise evaluation loss now (main process; None when it is off)."""
        if self.evaluation is None:
            return None
        value = self.evaluation.measure()
        if self.record.add(self.step, value, self.learned_vectors().tensors):
            self._save_best()
        if self.tracking:
            self.accelerator.log({"eval_loss": value}, step=self.step)
        logger.info("evaluation loss at step %d: %.5f", self.step, value)
        return value

    def _save_best(self) -> None:
        """The best embedding so far, beside the last (--save_best, main process)."""
        best = self.record.best_vectors
        if not (self.config.save_best and self.accelerator.is_main_process and best):
            return
        self.folder.take(self.folder.best_embedding)
        record = self.record
        metadata = {k: str(v) for k, v in self._facts().items() if k != "num_processes"}
        metadata.update(steps=str(record.best_step), eval_loss=str(record.best))
        save_vectors(self.folder.best_embedding, EmbeddingVectors(best), metadata)

    def save_samples(self) -> Path | None:
        """A grid of samples for the validation prompt (main process); None when disabled."""
        config = self.config
        if not config.num_validation_images or not self.accelerator.is_main_process:
            return None
        prompt = config.validation_prompt or validation_prompt(
            config.placeholder_token, config.learnable_property
        )
        encoders = [self.accelerator.unwrap_model(e) for e in self.conditioning.text_encoders]
        images = render_samples(
            self.parts,
            encoders,
            prompt,
            config.num_validation_images,
            self.resolution,
            self.seed,
            self.accelerator.device,
        )
        path = self.folder.sample(self.step)
        self.folder.take(path)
        save_grid(images, path)
        logger.info("sample grid for %r at step %d: %s", prompt, self.step, path)
        return path

    def _stop_is_requested(self) -> bool:
        """All processes stop together, whichever of them was interrupted."""
        flag = torch.tensor(float(self.trainer._stop_requested), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "max")
        return bool(flag.item())

    def _facts(self) -> dict[str, Any]:
        info = self.parts.info
        return {
            "placeholder_token": self.config.placeholder_token,
            "trigger": self.config.trigger,
            "base": info.base,
            "token_dimension": info.token_dim,
            "num_vectors": self.config.num_vectors,
            "seed": self.seed,
            "num_processes": self.accelerator.num_processes,
        }

    def save_checkpoint(self) -> Path:
        accelerator = self.accelerator
        final = self.folder.checkpoint(self.step)
        temp = self.folder.partial(final)
        if accelerator.is_main_process:
            self.folder.take(temp, final)
            begin_checkpoint(temp)
        accelerator.wait_for_everyone()
        save_process_state(temp, accelerator.process_index, self.sampler.state_dict())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            snapshot = TrainingSnapshot(
                step=self.step,
                vectors=self.learned_vectors().tensors,
                optimizer=self.optimizer.state_dict(),
                lr_scheduler=self.lr_scheduler.state_dict(),
                facts={
                    **self._facts(),
                    "images": self.image_record,
                    "optimizer": self.config.optimizer,
                    "evaluation": self.record.state_dict(),
                },
                best_vectors=self.record.best_vectors,
            )
            finish_checkpoint(temp, final, snapshot)
            self.history.plot(
                f"{self.config.placeholder_token} on {Path(self.parts.info.label).name}",
                self.record.start,
            )
            logger.info("saved checkpoint at step %d", self.step)
        accelerator.wait_for_everyone()
        return final

    def _finish(self, completed: bool, checkpoint: Path) -> TrainingResult:
        embedding_path = self.folder.embedding
        summary_path = self.folder.summary
        facts = self._facts()
        if self.accelerator.is_main_process:
            metadata = {key: str(value) for key, value in facts.items() if key != "num_processes"}
            save_vectors(
                embedding_path, self.learned_vectors(), {**metadata, "steps": str(self.step)}
            )
            summary = {
                **facts,
                "model": self.config.model,
                "model_folder": str(self.parts.info.folder or ""),
                "resolution": self.resolution,
                "steps": self.step,
                "completed": completed,
                "embedding": embedding_path.name,
                "evaluation": self.record.summary(
                    self.folder.best_embedding.name if self.config.save_best else None
                ),
                "options": self.config.model_dump(mode="json"),
            }
            write_json_atomically(summary_path, summary)
            if not self.config.only_save_embeds and self.parts.info.folder is not None:
                _export_pipeline(
                    self.parts.info.folder,
                    embedding_path,
                    self.config.placeholder_token,
                    self.folder,
                )
            logger.info(
                "%s embedding after %d steps: %s",
                "finished" if completed else "stopped early; saved the",
                self.step,
                embedding_path,
            )
        self.accelerator.wait_for_everyone()
        return TrainingResult(
            embedding_path,
            summary_path,
            self.step,
            completed,
            checkpoint,
            self.parts.info,
            self.config.trigger,
            self.accelerator.is_main_process,
        )


class _History:
    """Loss and learning rate of every update, for plots; truncated on resume."""

    def __init__(self, folder: RunFolder, accelerator: Accelerator) -> None:
        self.path = folder.history
        self.plot_path = folder.loss_plot
        self.enabled = accelerator.is_main_process
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, step: int) -> None:
        """Keep the updates up to `step`; a line torn by a crash mid-write is dropped."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = "".join(f"{line}\n" for line in lines if _step_of(line) <= step)
        write_atomically(self.path, lambda temp: temp.write_text(kept, encoding="utf-8"))

    def plot(self, title: str, start_eval: float | None) -> None:
        if self.enabled and self.path.is_file():
            write_loss_plot(self.path, self.plot_path, title, start_eval)

    def add(
        self, step: int, loss: float, learning_rate: float, eval_loss: float | None = None
    ) -> None:
        """One line per update; `eval_loss` when the evaluation loss was measured after it."""
        if self.enabled:
            record = {"step": step, "loss": loss, "lr": learning_rate}
            if eval_loss is not None:
                record["eval_loss"] = eval_loss
            with disk_full_explained(self.path), self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


def _step_of(history_line: str) -> float:
    """The step a history line records; a line torn by a crash mid-write records none."""
    try:
        return float(json.loads(history_line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _choose_seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbelow(2**31)


def _usable_mixed_precision(requested: str) -> str:
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 needs a CUDA GPU; training in full precision on this device")
        return "no"
    return requested


def _source_precision(requested: str, source: ModelSource) -> str:
    """A model InvokeAI loads comes in the precision InvokeAI chose (its `precision` setting and
    device); the run follows it rather than convert the host's shared weights."""
    if source.dtype is None:
        return requested
    (chosen,) = [name for name, dtype in _DTYPES.items() if dtype == source.dtype]
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


def _require_exportable(info: ModelInfo, only_save_embeds: bool) -> None:
    """--no-only_save_embeds writes a diffusers pipeline, built from the model's folder."""
    if not only_save_embeds and info.folder is None:
        raise UserInputError(
            f"--no-only_save_embeds saves a diffusers pipeline, but {info.label} is a single-file "
            "checkpoint; keep --only_save_embeds (the default), or convert the model to "
            "diffusers in InvokeAI's model manager",
            option="only_save_embeds",
        )


@contextmanager
def _accelerator_session(accelerator: Accelerator) -> Iterator[None]:
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


def _choose_attention(parts: ModelParts, want_xformers: bool) -> None:
    """xformers when asked and installed; otherwise torch's SDPA (diffusers' default)."""
    if not want_xformers:
        return
    if not xformers_installed():
        logger.warning("xformers is not installed; using torch's scaled-dot-product attention")
        return
    parts.unet.enable_xformers_memory_efficient_attention()


def _refuse_to_clobber(folder: RunFolder) -> None:
    """A fresh run must not silently replace an earlier run's embedding or checkpoints."""
    if folder.embedding.exists() or list_checkpoints(folder.path):
        raise UserInputError(
            f"{folder.path} already holds an embedding or checkpoints from an earlier run; pass "
            "--resume_from_checkpoint latest to continue it, or --overwrite to start over",
            option="output_dir",
        )


def _is_main_rank() -> bool:
    """The main process, known before accelerate starts: launchers (torchrun, accelerate
    launch, MPI) give every process its rank in the environment, as accelerate reads it."""
    return get_cpu_distributed_information().rank == 0


def _clear_previous_run(folder: RunFolder) -> None:
    """A fresh run (allowed to overwrite) starts without the old run's checkpoints and log;
    only what our runs wrote is deleted."""
    folder.discard(*folder.owned_in(folder.checkpoints), folder.history, folder.best_embedding)


def _check_resumable(snapshot: TrainingSnapshot, config: TrainingConfig, info: ModelInfo) -> None:
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
def _run_logging(folder: RunFolder, accelerator: Accelerator) -> Iterator[None]:
    """The run's log beside its outputs (main process) and one voice on the terminal (the other
    processes report only warnings). Both end with the run: a form or server process trains many
    times, and each run's train.log holds that run alone."""
    package_logger = logging.getLogger("invokeai_ti_plugin")
    level = package_logger.level
    handler: logging.Handler | None = None
    if accelerator.is_main_process:
        folder.train_log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder.train_log, encoding="utf-8")
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


def _export_pipeline(
    model_folder: Path, embedding_path: Path, token: str, folder: RunFolder
) -> None:
    """A whole diffusers pipeline with the new word built in (--no-only_save_embeds)."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(model_folder), safety_checker=None)
    vectors = read_embedding_vectors(embedding_path).tensors
    if set(vectors) == set(SDXL_KEYS):
        for key, suffix in zip(SDXL_KEYS, ("", "_2"), strict=True):
            pipeline.load_textual_inversion(
                vectors[key],
                token=token,
                text_encoder=getattr(pipeline, f"text_encoder{suffix}"),
                tokenizer=getattr(pipeline, f"tokenizer{suffix}"),
            )
    else:
        pipeline.load_textual_inversion(str(embedding_path), token=token)
    target = folder.pipeline
    temp = folder.partial(target)
    folder.take(temp)
    folder.discard(temp)
    pipeline.save_pretrained(str(temp))
    folder.discard(target)
    temp.rename(target)
    logger.info("saved a pipeline with %s built in: %s", token, target)


def _tracker(config: TrainingConfig) -> str | None:
    """accelerate's TensorBoard tracker, when asked for and installed."""
    if config.report_to == "none":
        return None
    if importlib.util.find_spec("tensorboard") is None:
        logger.warning("tensorboard is not installed; logging to logs/history.jsonl only")
        return None
    return config.report_to


@contextmanager
def _stop_on_interrupt(trainer: Trainer) -> Iterator[None]:
    """First Ctrl-C: finish the update, save, stop. Second Ctrl-C: stop at once."""
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread: the caller stops us with request_stop
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if trainer._stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()
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
