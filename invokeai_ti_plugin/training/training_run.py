"""One training run on one process: the loop that trains the new word's vectors.

Only those vectors learn; the model is frozen and runs in the chosen precision, and the VAE
encodes each image once, before the first step. Every update is followed by what the
run owes the user: progress, the evaluation loss, checkpoints, sample grids, and at the end the
embedding and its summary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..atomic_files import write_json_atomically
from ..config import TrainingConfig
from ..errors import UserInputError
from .checkpoints import (
    ResumePoint,
    TrainingSnapshot,
    begin_checkpoint,
    finish_checkpoint,
    resume_hint,
    save_process_state,
)
from .compiled_unet import unet_for_training
from .embedding_file import EMBEDDING_KEY, SDXL_KEYS, EmbeddingVectors, save_vectors
from .evaluation import EvaluationRecord, FixedEvaluation, fixed_examples
from .examples import ExampleSampler
from .history import RunHistory
from .images import TrainingImage
from .latent_cache import LatentCache
from .memory_plan import free_gpu_bytes, plan_memory, release_cached_memory
from .model_files import ModelParts
from .new_tokens import PlaceholderEmbedding, install_placeholder_embedding, placeholder_tokens
from .objective import denoising_loss
from .optimizers import build_lr_scheduler, build_optimizer, limit_norms, scaled_learning_rate
from .out_of_memory import unless_out_of_memory
from .pipeline_export import export_pipeline
from .prompts import caption_prompt, training_prompts, validation_prompt
from .reports import ProgressCallback, ProgressUpdate, TrainingResult
from .run_folder import RunFolder
from .run_setup import choose_attention
from .samples import render_samples, save_grid
from .text_conditioning import TextConditioning, sdxl_time_ids

logger = logging.getLogger(__name__)


class TrainingRun:
    """The state of one training run on one process, and its loop (`train`): the recipe of
    textual inversion, from the first update to the last checkpoint and embedding."""

    def __init__(
        self,
        config: TrainingConfig,
        folder: RunFolder,
        accelerator: Accelerator,
        parts: ModelParts,
        new_words: list[tuple[list[int], torch.Tensor]],
        images: list[TrainingImage],
        image_record: dict[str, str],  # what checkpoints record of the images (a resume checks)
        resolution: int,
        seed: int,
        on_progress: ProgressCallback | None,
        stop_requested: Callable[[], bool],  # asked after every update, on every process
    ) -> None:
        self.config = config
        self.on_progress = on_progress
        self.stop_requested = stop_requested
        self.folder = folder
        self.accelerator = accelerator
        self.parts = parts
        self.seed = seed
        self.resolution = resolution
        self.image_record = image_record
        self.step = 0
        self.resumed: ResumePoint | None = None
        device = accelerator.device
        choose_attention(parts, config.enable_xformers_memory_efficient_attention)

        logger.info("%d images at %d px, each encoded once (and mirrored)", len(images), resolution)
        self.latents = LatentCache(
            parts.vae_loader().to(device),
            [image.pixels for image in images],
            with_flips=True,
        )
        release_cached_memory(device)  # the VAE and its activations: gone before the UNet comes
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
        self.training_unet = unet_for_training(parts.unet, config.torch_compile)

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
        self.lr_scheduler = build_lr_scheduler(config, optimizer)
        *encoders, self.optimizer = accelerator.prepare(*parts.text_encoders, optimizer)
        self.conditioning = TextConditioning(
            parts.tokenizers, encoders, templates + captions, device
        )
        logger.info("initial vector norms: %s", self._norms_text())
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
        self.history = RunHistory(folder, accelerator)
        self.tracking = bool(accelerator.log_with)

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

    def _norms_text(self) -> str:
        """Each vector's length, per encoder for SDXL (`clip_l 0.41; clip_g 0.63`): what
        --max_embedding_norm is chosen from."""
        norms = {
            key: ", ".join(f"{norm:.3f}" for norm in vectors.norm(dim=-1))
            for key, vectors in self.learned_vectors().tensors.items()
        }
        if len(norms) == 1:
            return next(iter(norms.values()))
        return "; ".join(f"{key} {text}" for key, text in norms.items())

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
        if self.tracking:  # only now: a fresh run has cleared the last run's event files
            accelerator.init_trackers(self.folder.tensorboard.name)
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
            loss_value = self._finite(reduced) / config.gradient_accumulation_steps
            now = time.perf_counter()
            elapsed, last = now - last, now
            seconds_per_step = (
                elapsed if seconds_per_step == 0 else 0.9 * seconds_per_step + 0.1 * elapsed
            )
            learning_rate = float(self.lr_scheduler.get_last_lr()[0])
            self.history.add(self.step, loss_value, learning_rate, self._evaluate_if_due())
            if self.tracking:
                accelerator.log({"loss": loss_value, "lr": learning_rate}, step=self.step)
            if accelerator.is_main_process and self.on_progress:
                self.on_progress(
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

    def _finite(self, loss: torch.Tensor) -> float:
        """`loss` read from the device, with the vectors' finiteness in the same read (each read
        waits for the GPU to finish). A loss or vector that is no longer finite never
        recovers: stop before anything of it is saved, so the checkpoints and the embedding on
        disk stay the last good ones."""
        vectors = self.learned_vectors().tensors.values()
        finite = torch.stack([torch.isfinite(v).all() for v in vectors]).all()
        value, vectors_finite = torch.stack([loss.float(), finite.float()]).tolist()
        if math.isfinite(value) and vectors_finite:
            return value
        what = f"the loss became {value}" if not math.isfinite(value) else "the vectors overflowed"
        raise UserInputError(
            f"training diverged at step {self.step}: {what}, and nothing of it was saved; run "
            f"again with a lower --learning_rate (this run used {self.config.learning_rate:g})"
            f"{resume_hint(self.config.out_dir)}",
            option="learning_rate",
        )

    def _loss_of_next_batch(self) -> torch.Tensor:
        if self.config.torch_compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are done
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
            self.training_unet,
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
        value = unless_out_of_memory(
            self.evaluation.measure,
            self.accelerator.device,
            f"no evaluation loss at step {self.step}: the GPU ran out of memory measuring it, "
            "in batches of --train_batch_size; a smaller one, or --no-eval_loss, avoids it",
        )
        if value is None:
            return None
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
        metadata = self._embedding_metadata(self.record.best_step, eval_loss=str(self.record.best))
        save_vectors(self.folder.best_embedding, EmbeddingVectors(best), metadata)

    def _embedding_metadata(self, steps: int | None, **extra: str) -> dict[str, str]:
        """What an embedding file says of itself: the run's facts as text (no process count:
        the file is the same however many trained it), its step, and `extra`."""
        facts = {key: str(value) for key, value in self._facts().items()}
        del facts["num_processes"]
        return {**facts, "steps": str(steps), **extra}

    def save_samples(self) -> Path | None:
        """A grid of samples for the validation prompt (main process); None when disabled."""
        config = self.config
        if not config.num_validation_images or not self.accelerator.is_main_process:
            return None
        prompt = config.validation_prompt or validation_prompt(
            config.placeholder_token, config.learnable_property
        )
        encoders = [self.accelerator.unwrap_model(e) for e in self.conditioning.text_encoders]
        device = self.accelerator.device
        release_cached_memory(device)  # training's cached activations: the card's again
        images = unless_out_of_memory(
            lambda: render_samples(
                self.parts,
                encoders,
                prompt,
                config.num_validation_images,
                self.resolution,
                self.seed,
                device,
            ),
            device,
            f"no sample grid at step {self.step}: the GPU ran out of memory drawing "
            f"{config.num_validation_images} images at {self.resolution} px; a smaller "
            "--num_validation_images (or 0) avoids it",
        )
        if images is None:
            return None
        path = self.folder.sample(self.step)
        self.folder.take(path)
        save_grid(images, path)
        logger.info("sample grid for %r at step %d: %s", prompt, self.step, path)
        return path

    def _stop_is_requested(self) -> bool:
        """All processes stop together, whichever of them was interrupted (a process alone
        asks no device: a read from it would wait for the GPU every update)."""
        if self.accelerator.num_processes == 1:
            return self.stop_requested()
        flag = torch.tensor(float(self.stop_requested()), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())

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
            save_vectors(
                embedding_path, self.learned_vectors(), self._embedding_metadata(self.step)
            )
            summary = {
                **facts,
                "model": self.config.model,
                "model_folder": str(self.parts.info.folder or ""),
                "resolution": self.resolution,
                "prediction_type": self.parts.noise_scheduler.config.prediction_type,
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
                export_pipeline(
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
