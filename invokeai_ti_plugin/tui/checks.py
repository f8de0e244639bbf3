"""The form's values checked before any training time is spent, each problem by its field.

Nothing is re-implemented: the checks are `TrainingConfig`'s own validators and the trainer's own
tokenizer check, and errors the run itself raises later are placed by their `option` the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import TrainingConfig, field_problems
from ..errors import UserInputError

OTHER = ""  # the key of a problem that belongs to no single field (as in `field_problems`)


class FormProblems(Exception):
    """Messages by field name (`OTHER` for the rest), for the form to show beside each field."""

    def __init__(self, problems: dict[str, str]) -> None:
        super().__init__(
            "; ".join(f"--{field}: {text}" if field else text for field, text in problems.items())
        )
        self.problems = problems

    @classmethod
    def of(cls, error: UserInputError) -> FormProblems:
        return cls({error.option or OTHER: error.args[0]})


def validated_config(options: dict[str, Any]) -> TrainingConfig:
    """The one `TrainingConfig`, or `FormProblems` with pydantic's message for each field."""
    try:
        return TrainingConfig(**options)
    except ValidationError as error:
        raise FormProblems(field_problems(error)) from error


def check_vocabulary(config: TrainingConfig, model_folder: Path) -> None:
    """Refuse a trigger the model's tokenizer already has, as the trainer would, but now."""
    from transformers import CLIPTokenizer

    from ..training.new_tokens import add_placeholder_tokens

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(model_folder), subfolder="tokenizer")
    except (OSError, ValueError) as error:
        raise FormProblems({"model": f"cannot read its tokenizer: {error}"}) from error
    try:
        add_placeholder_tokens(tokenizer, config.placeholder_token, config.num_vectors)
    except UserInputError as error:
        raise FormProblems.of(error) from error
