"""The form's values checked before any training time is spent, each problem by its field.

Nothing is re-implemented: the options are checked by `build_config` (`TrainingConfig`'s own
validators), the trigger by the trainer's own tokenizer check, and every error, also those the run
raises later, is placed beside its field by its `UserInputError.problems`.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainingConfig
from ..errors import UserInputError


def check_vocabulary(config: TrainingConfig, model_folder: Path) -> None:
    """Refuse a trigger the model's tokenizer already has, as the trainer would, but now."""
    from transformers import CLIPTokenizer

    from ..training.new_tokens import add_placeholder_tokens

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(model_folder), subfolder="tokenizer")
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot read its tokenizer: {error}", option="model") from error
    add_placeholder_tokens(tokenizer, config.placeholder_token, config.num_vectors)
