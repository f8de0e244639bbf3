"""A whole diffusers pipeline with the new word built in, for --no-only_save_embeds."""

from __future__ import annotations

import logging
from pathlib import Path

from .embedding_file import EMBEDDING_KEY, SDXL_KEYS, read_embedding_vectors
from .run_folder import RunFolder
from .weight_files import pipeline_load_options

logger = logging.getLogger(__name__)


def export_pipeline(
    model_folder: Path, embedding_path: Path, token: str, folder: RunFolder
) -> None:
    """A whole diffusers pipeline with the new word built in (--no-only_save_embeds), each
    component in the precision its files had, written under the plain file names (no variant)
    that every loader finds."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(
        str(model_folder), safety_checker=None, **pipeline_load_options(model_folder)
    )
    vectors = read_embedding_vectors(embedding_path).tensors
    keys = SDXL_KEYS if set(vectors) == set(SDXL_KEYS) else (EMBEDDING_KEY,)
    for key, suffix in zip(keys, ("", "_2")[: len(keys)], strict=True):
        encoder = getattr(pipeline, f"text_encoder{suffix}")
        tokenizer = getattr(pipeline, f"tokenizer{suffix}")
        # the rows the loader adds, added first without transformers' mean-resizing, which only
        # warns about and samples a covariance of the whole table for rows the loader overwrites
        encoder.resize_token_embeddings(len(tokenizer) + len(vectors[key]), mean_resizing=False)
        pipeline.load_textual_inversion(
            vectors[key], token=token, text_encoder=encoder, tokenizer=tokenizer
        )
    target = folder.pipeline
    temp = folder.partial(target)
    folder.take(temp)
    folder.discard(temp)
    pipeline.save_pretrained(str(temp))
    folder.discard(target)
    temp.rename(target)
    logger.info("saved a pipeline with %s built in: %s", token, target)
