"""The form: every option on one scrolling page, keyboard-only, each problem beside its field.

It only gathers values into an options dict; `TrainingConfig` alone decides what is valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

from ..config import trigger_folders, trigger_of
from ..errors import UserInputError, option_message
from ..host.installed_models import InstalledModel
from .autofill import Follower, has_checkpoint, native_resolution
from .fields import FIELDS, MODEL, FormField, WidgetValue, initial_value, option_value

MODEL_HELP = (
    "The base model: the models installed in InvokeAI. Move with the arrow keys. "
    "An embedding only works with models of the same base (SD 1.x, SD 2.x, ...) as this one."
)
FieldWidget = Input | Checkbox | Select[str]


def _model_option(model: InstalledModel, width: int) -> Option:
    """A trainable model, or a greyed-out one that says why it cannot be trained."""
    prompt = Text(f"{model.name:<{width}}  ")
    prompt.append(model.kind, "dim" if model.trainable else "")
    if model.problem:
        prompt.append(f"  not trainable: {model.problem}")
    return Option(prompt, id=model.key, disabled=not model.trainable)


class TrainingForm(Vertical):
    """The fields, a help line for the focused one, and Cancel / OK."""

    DEFAULT_CSS = """
    TrainingForm { height: 1fr; }
    TrainingForm #fields { height: 1fr; padding: 0 1; }
    TrainingForm .row { height: auto; }
    TrainingForm .label { width: 18; color: $text-primary; }
    TrainingForm OptionList { height: auto; max-height: 8; width: 1fr; border: none;
                              padding: 0; margin-bottom: 1; }
    TrainingForm .hint { width: auto; padding-left: 2; color: $text-muted; }
    TrainingForm .problem { display: none; color: $text-error; padding-left: 18; }
    TrainingForm .problem.-shown { display: block; }
    TrainingForm #help { height: auto; min-height: 3; max-height: 8; padding: 0 1;
                         color: $text-muted; background: $boost; }
    TrainingForm #actions { height: 1; padding: 0 1; }
    TrainingForm #status { width: 1fr; color: $text-warning; }
    TrainingForm Button { margin-left: 2; min-width: 8; }
    """

    def __init__(
        self, root: Path, models: list[InstalledModel], prefill: Mapping[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.models = {model.key: model for model in models}
        self.prefill = prefill
        self.follower = Follower()

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="fields"):
            with Horizontal(classes="row"):
                yield Label("Model", classes="label")
                width = max((len(model.name) for model in self.models.values()), default=0)
                options = [_model_option(model, width) for model in self.models.values()]
                yield OptionList(*options, id=MODEL)
            yield Static(classes="problem", id=f"{MODEL}-problem")
            for field in FIELDS:
                with Horizontal(classes="row"):
                    yield Label(field.label, classes="label")
                    yield self._widget(field)
                    if field.kind != "check":
                        yield Label(field.hint, classes="hint", id=f"{field.name}-hint")
                yield Static(classes="problem", id=f"{field.name}-problem")
        yield Static(id="help")
        with Horizontal(id="actions"):
            yield Static(id="status")
            yield Button("Cancel", id="cancel", compact=True)
            yield Button("OK", id="ok", variant="primary", compact=True)

    def _widget(self, field: FormField) -> Widget:
        value = initial_value(field, self.prefill)
        if field.kind == "check":
            return Checkbox(field.hint, bool(value), id=field.name, compact=True)
        widget: Widget
        if field.kind == "choice":
            choices = [(choice, choice) for choice in field.choices]
            widget = Select(
                choices, value=str(value), allow_blank=False, id=field.name, compact=True
            )
        else:
            widget = Input(str(value), type=field.kind, id=field.name, compact=True)
        widget.styles.width = field.width or "1fr"
        return widget

    def on_mount(self) -> None:
        models = list(self.models.values())
        wanted = str(self.prefill.get(MODEL, ""))
        chosen = [i for i, m in enumerate(models) if m.trainable and wanted in (m.key, m.name)]
        trainable = [i for i, m in enumerate(models) if m.trainable]
        self.query_one(f"#{MODEL}", OptionList).highlighted = (chosen or trainable or [None])[0]
        if not trainable:
            self.show_problems(
                UserInputError(f"none of the models installed in {self.root} can be trained", MODEL)
            )
        self._update_warmup(self._value("lr_scheduler"))
        self._fill_from_trigger(str(self._value("placeholder_token")))

    # -- reading and marking the fields -------------------------------------------------------

    def _field(self, name: str) -> FieldWidget:
        widget = self.query_one(f"#{name}")
        assert isinstance(widget, Input | Checkbox | Select)
        return widget

    def _value(self, name: str) -> WidgetValue:
        value = self._field(name).value
        assert isinstance(value, str | bool)
        return value

    def chosen_model(self) -> InstalledModel | None:
        option = self.query_one(f"#{MODEL}", OptionList).highlighted_option
        return self.models[option.id] if option and option.id and not option.disabled else None

    def options(self) -> dict[str, Any]:
        """The form's values over the command line's options; blank fields keep the default."""
        options: dict[str, Any] = {**self.prefill, "root": self.root}
        model = self.chosen_model()
        options[MODEL] = model.key if model else None
        for field in FIELDS:
            options[field.name] = option_value(field, self._value(field.name))
        return {name: value for name, value in options.items() if value is not None}

    def show_problems(self, error: UserInputError | None) -> None:
        """Each message beside its field (the first one focused); the rest on the status line."""
        for problem in self.query(".problem").results(Static):
            problem.update("")
            problem.remove_class("-shown")
        found = error.problems if error else {}
        others = []
        for name, text in found.items():
            if self.query(f"#{name}-problem"):
                self.query_one(f"#{name}-problem", Static).update(text)
                self.query_one(f"#{name}-problem").add_class("-shown")
            else:
                others.append(option_message(name, text))
        marked = [name for name in (MODEL, *(f.name for f in FIELDS)) if name in found]
        summary = "Please correct the fields marked in red. " if marked else ""
        self.set_status(summary + " ".join(others))
        if marked:
            self.query_one(f"#{marked[0]}").focus()

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    # -- what the form fills in by itself ------------------------------------------------------

    def _follow(self, name: str, new: WidgetValue) -> None:
        widget = self._field(name)
        if self.follower.fill(name, self._value(name), new):
            widget.value = new

    def _fill_from_trigger(self, text: str) -> None:
        trigger = trigger_of(text)
        data_dir, output_dir = trigger_folders(self.root, trigger) if trigger else ("", "")
        self._follow("train_data_dir", str(data_dir))
        self._follow("output_dir", str(output_dir))
        hint = f"in prompts: <{trigger}>" if trigger else "a new word, e.g. psychedelic"
        self.query_one("#placeholder_token-hint", Label).update(hint)

    def _update_warmup(self, scheduler: WidgetValue) -> None:
        """Warmup steps only matter with a warmup scheduler; say so, and lock it otherwise."""
        self._field("lr_warmup_steps").disabled = scheduler == "constant"

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        model = self.chosen_model()
        size = native_resolution(model) if model else None
        if size is not None:
            self._follow("resolution", str(size))
        native = f"px; {size} is native to this model" if size else "px"
        self.query_one("#resolution-hint", Label).update(native)

    def on_input_changed(self, event: Input.Changed) -> None:
        self._clear_problem(event.input)
        if event.input.id == "placeholder_token":
            self._fill_from_trigger(event.value)
        elif event.input.id == "output_dir":
            self._follow("resume_from_checkpoint", has_checkpoint(event.value))

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self._clear_problem(event.checkbox)

    def on_select_changed(self, event: Select.Changed) -> None:
        self._clear_problem(event.select)
        if event.select.id == "lr_scheduler":
            self._update_warmup(str(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in a text field moves on, as in the 2.3 form; only OK starts training."""
        self.screen.focus_next()

    def _clear_problem(self, widget: Widget) -> None:
        for problem in self.query(f"#{widget.id}-problem"):
            problem.remove_class("-shown")

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        """The focused field's description from `TrainingConfig`: the same help as --help."""
        name = event.widget.id or ""
        fields = {field.name: field.help for field in FIELDS}
        helps = {MODEL: MODEL_HELP, **fields, "ok": "Start training.", "cancel": "Quit."}
        if name in helps:  # not an inner part, such as an open choice list
            self.query_one("#help", Static).update(helps[name])
