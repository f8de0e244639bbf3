"""The form's fields: which `TrainingConfig` options it shows, in the manual's order, and how a
widget's value turns into an option value and back.

Labels are short; the help text is each option's description in `TrainingConfig`, and choice
lists are its `Literal` types, so the form cannot drift from the command line.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_core import PydanticUndefined

from ..config import TrainingConfig, trigger_of

Kind = Literal["text", "integer", "number", "check", "choice"]
WidgetValue = str | bool

MODEL = "model"  # shown as the list of installed models, not as one of the fields below


@dataclass(frozen=True)
class FormField:
    name: str  # the `TrainingConfig` field
    label: str
    kind: Kind
    hint: str = ""  # a few words beside the widget; a check box's own label
    width: int | None = 12  # columns for a text or choice field; None: all there is

    @property
    def help(self) -> str:
        return TrainingConfig.model_fields[self.name].description or ""

    @property
    def choices(self) -> tuple[str, ...]:
        return typing.get_args(TrainingConfig.model_fields[self.name].annotation)


FIELDS: tuple[FormField, ...] = (
    FormField("placeholder_token", "Trigger term", "text", width=24),
    FormField("initializer_token", "Initializer", "text", "existing word(s)", width=24),
    FormField("num_vectors", "Vectors", "integer", "per trigger"),
    FormField("learnable_property", "Learn", "choice", "what the images share", width=24),
    FormField("resume_from_checkpoint", "Resume", "check", "from the last saved checkpoint"),
    FormField("train_data_dir", "Data directory", "text", width=None),
    FormField("output_dir", "Output directory", "text", width=None),
    FormField("resolution", "Resolution", "integer", "px"),
    FormField("center_crop", "Centre crop", "check", "crop images to a centred square"),
    FormField("mixed_precision", "Mixed precision", "choice", width=24),
    FormField("torch_compile", "Compile UNet", "choice", "long runs on a fast GPU", width=24),
    FormField("max_train_steps", "Max steps", "integer"),
    FormField("train_batch_size", "Batch size", "integer", "images per step"),
    FormField("optimizer", "Optimizer", "choice", "prodigy: no rate to tune", width=24),
    FormField("learning_rate", "Learning rate", "number", "blank: the optimizer's"),
    FormField("scale_lr", "Scale LR", "check", "by GPUs x batch size x accumulation"),
    FormField(
        "enable_xformers_memory_efficient_attention", "xformers", "check", "memory-efficient"
    ),
    FormField("lr_scheduler", "LR scheduler", "choice", width=24),
    FormField("gradient_accumulation_steps", "Accumulation", "integer", "batches per update"),
    FormField("lr_warmup_steps", "Warmup steps", "integer", "only with a warmup scheduler"),
    FormField("snr_gamma", "Min-SNR gamma", "number", "blank: off; typical: 5"),
    FormField("max_embedding_norm", "Max norm", "number", "blank: no limit"),
    FormField("validation_prompt", "Sample prompt", "text", width=None),
    FormField("num_validation_images", "Sample images", "integer", "per grid; 0: none"),
    FormField("validation_steps", "Sample every", "integer", "steps; 0: at the end only"),
    FormField("eval_loss", "Eval loss", "check", "measure progress with fixed noise"),
    FormField("save_best", "Save best", "check", "also keep the best evaluation's embedding"),
    FormField("overwrite", "Overwrite", "check", "replace an earlier run's outputs"),
)


def initial_value(field: FormField, prefill: Mapping[str, Any]) -> WidgetValue:
    """What the widget starts with: the option given on the command line, else its default."""
    if field.name in prefill:
        option = prefill[field.name]
    else:
        option = TrainingConfig.model_fields[field.name].get_default(call_default_factory=True)
    if option is PydanticUndefined or option is None:
        option = None
    if field.name == "placeholder_token":
        return trigger_of(str(option)) if option else ""
    if field.kind == "check":
        return bool(option)  # a resume checkpoint ("latest") ticks its box too
    return "" if option is None else str(option)


def option_value(field: FormField, value: WidgetValue) -> Any:
    """The option for a widget's value; None leaves the option at its default.

    The trigger is typed without angle brackets, as the manual says, and becomes `<trigger>`;
    the resume box means "the latest checkpoint".
    """
    if field.name == "placeholder_token":
        return f"<{trigger_of(str(value))}>" if str(value).strip() else None
    if field.name == "resume_from_checkpoint":
        return "latest" if value else None
    if isinstance(value, str):
        return value.strip() or None
    return value
