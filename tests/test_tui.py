"""The terminal form, driven headless through Textual's pilot against a real InvokeAI root.

Screenshots of the filled form and of the run go to $INVOKEAI_TI_ARTIFACTS (else the test's
temporary folder), as SVG, at 80x24 and 120x40.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from textual.pilot import Pilot
from textual.widgets import Checkbox, Input, Label, OptionList, Select, Static

from invokeai_ti_plugin import launcher
from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import build_config, default_batch_size, xformers_installed
from invokeai_ti_plugin.host.installed_models import install_main_model, installed_models_at
from invokeai_ti_plugin.host.model_db import open_host_models
from invokeai_ti_plugin.training.checkpoints import STATE_FILENAME, list_checkpoints
from invokeai_ti_plugin.training.model_files import inspect_model
from invokeai_ti_plugin.training.run_folder import RunFolder
from invokeai_ti_plugin.tui.app import TrainingApp
from invokeai_ti_plugin.tui.form import TrainingForm

from .conftest import host_records

Script = Callable[[Pilot[None]], Awaitable[None]]
SIZES = ((80, 24), (120, 40))


def _drive(app: TrainingApp, script: Script, size: tuple[int, int] = SIZES[0]) -> None:
    """Run the real app headless, with `script` at the keyboard."""

    async def run() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await script(pilot)

    asyncio.run(run())


def _form(root: Path, **prefill: Any) -> TrainingApp:
    return TrainingApp(root, installed_models_at(root), prefill)


def _value(app: TrainingApp, name: str) -> str | bool:
    widget = app.query_one(f"#{name}")
    assert isinstance(widget, Input | Checkbox | Select)
    value = widget.value
    assert isinstance(value, str | bool)
    return value


def _problem(app: TrainingApp, name: str) -> str:
    problem = app.query_one(f"#{name}-problem", Static)
    return str(problem.render()) if problem.has_class("-shown") else ""


async def _set(pilot: Pilot[None], name: str, value: str) -> None:
    """Clear a text field and type into it, as a user would."""
    pilot.app.query_one(f"#{name}", Input).focus()
    await pilot.press("ctrl+u", "end", "ctrl+u", *value)


async def _press_ok(pilot: Pilot[None]) -> None:
    pilot.app.query_one("#ok").focus()
    await pilot.press("enter")


async def _wait_for_run(app: TrainingApp, pilot: Pilot[None]) -> None:
    await app.workers.wait_for_complete()
    for _ in range(3):  # the run's last messages
        await pilot.pause()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("INVOKEAI_TI_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {folder}")
    return folder


async def _screenshots(pilot: Pilot[None], folder: Path, name: str) -> None:
    for width, height in SIZES:
        await pilot.resize_terminal(width, height)
        await pilot.pause()
        pilot.app.save_screenshot(f"{name}-{width}x{height}.svg", path=str(folder))


def test_the_model_list_is_the_hosts_models(host_root: Path) -> None:
    app = _form(host_root)
    models = {model.name: model for model in installed_models_at(host_root)}

    async def script(pilot: Pilot[None]) -> None:
        listing = app.query_one("#model", OptionList)
        assert app.focused is listing
        options = [listing.get_option_at_index(i) for i in range(listing.option_count)]
        shown = {str(option.prompt).split()[0]: option for option in options}
        assert set(shown) == set(models)
        moved = shown["moved-away"]
        assert moved.disabled and "not trainable: its files are missing" in str(moved.prompt)
        assert not shown["tiny-sd-1"].disabled and not shown["tiny-sd-2"].disabled
        form = app.query_one(TrainingForm)
        assert form.chosen_model() == models["tiny-sd-1"]
        native = inspect_model(models["tiny-sd-1"].path).native_resolution
        assert _value(app, "resolution") == str(native)  # follows the chosen model's base
        await pilot.press("down")
        assert form.chosen_model() == models["tiny-sd-2"]
        for _ in range(len(models)):
            await pilot.press("down")  # past the end: the unsupported model cannot be chosen
        chosen = form.chosen_model()
        assert chosen is not None and chosen.trainable
        assert _value(app, "train_batch_size") == str(default_batch_size())
        assert _value(app, "enable_xformers_memory_efficient_attention") == xformers_installed()
        assert "warmup scheduler" in str(app.query_one("#lr_warmup_steps-hint", Label).render())
        assert app.query_one("#lr_warmup_steps").disabled  # 'constant' has no warmup
        app.query_one("#lr_scheduler", Select).value = "constant_with_warmup"
        await pilot.pause()
        assert not app.query_one("#lr_warmup_steps").disabled

    _drive(app, script)


def test_typing_a_trigger_fills_the_folders_and_they_stay_editable(
    host_root: Path, artifacts: Path
) -> None:
    app = _form(host_root)

    async def script(pilot: Pilot[None]) -> None:
        await pilot.press("tab")
        assert app.focused is app.query_one("#placeholder_token")
        await pilot.press(*"striped-ball")
        await pilot.pause()
        assert _value(app, "train_data_dir") == str(
            host_root / "text-inversion-training-data" / "striped-ball"
        )
        assert _value(app, "output_dir") == str(
            host_root / "text-inversion-output" / "striped-ball"
        )
        assert "<striped-ball>" in str(app.query_one("#placeholder_token-hint", Label).render())
        await pilot.press("ctrl+n")
        assert app.focused is app.query_one("#initializer_token")
        await pilot.press("ctrl+p")
        assert app.focused is app.query_one("#placeholder_token")
        await _screenshots(pilot, artifacts, "form-filled")

        await _set(pilot, "train_data_dir", "/my/pictures")
        app.query_one("#placeholder_token").focus()
        await pilot.press("end", *"-2")
        await pilot.pause()
        assert _value(app, "train_data_dir") == "/my/pictures"  # the user's own value stays
        assert str(_value(app, "output_dir")).endswith("text-inversion-output/striped-ball-2")

    _drive(app, script)


def test_resume_ticks_itself_when_the_trigger_has_a_checkpoint(host_root: Path) -> None:
    saved = RunFolder(host_root / "text-inversion-output" / "striped-ball").checkpoint(3)
    saved.mkdir(parents=True)
    (saved / STATE_FILENAME).write_text("{}")
    app = _form(host_root)

    async def script(pilot: Pilot[None]) -> None:
        await _set(pilot, "placeholder_token", "striped-ball")
        await pilot.pause()
        assert _value(app, "resume_from_checkpoint") is True
        await pilot.press(*"-new")
        await pilot.pause()
        assert _value(app, "resume_from_checkpoint") is False  # no checkpoint for this one

    _drive(app, script)


def _model_knowing(source: Path, token: str, folder: Path) -> Path:
    """A copy of `source` whose tokenizer already has `token` (an embedding built in)."""
    from transformers import CLIPTokenizer

    shutil.copytree(source, folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    tokenizer.add_tokens([token])
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder


def test_invalid_fields_block_ok_with_their_messages(
    host_root: Path, object_images: Path, sd1_model: Path, tmp_path: Path
) -> None:
    knowing = _model_knowing(sd1_model, "<striped-ball>", tmp_path / "knows-striped-ball")
    with open_host_models(host_root) as models:
        install_main_model(models, knowing, "knows-striped-ball")
    empty = tmp_path / "no-pictures"
    empty.mkdir()
    app = _form(host_root, model="knows-striped-ball")  # chosen by name, as with --model

    async def script(pilot: Pilot[None]) -> None:
        await _set(pilot, "placeholder_token", "striped-ball")
        await _set(pilot, "max_train_steps", "0")
        await _press_ok(pilot)
        assert "does not exist" in _problem(app, "train_data_dir")
        assert "must be a positive whole number" in _problem(app, "max_train_steps")
        assert app.focused is app.query_one("#train_data_dir")  # the first problem
        assert "fields marked in red" in str(app.query_one("#status", Static).render())

        await _set(pilot, "train_data_dir", str(empty))
        await _set(pilot, "max_train_steps", "2")
        await _press_ok(pilot)
        assert "holds no PNG, JPEG or WebP images" in _problem(app, "train_data_dir")
        assert _problem(app, "max_train_steps") == ""

        await _set(pilot, "train_data_dir", str(object_images))
        await _press_ok(pilot)
        await _wait_for_run(app, pilot)
        assert "already a word of the model's vocabulary" in _problem(app, "placeholder_token")
        assert app.phase == "form"

    _drive(app, script)
    assert not (host_root / "text-inversion-output").exists()  # nothing was written
    assert host_records(host_root) == []


def test_the_convergence_options_reach_the_config(host_root: Path, object_images: Path) -> None:
    """Min-SNR, the norm limit and the evaluation options, typed and ticked in the form, are
    the command line's options, checked the same way."""
    app = _form(host_root)
    chosen: dict[str, object] = {}

    async def script(pilot: Pilot[None]) -> None:
        await _set(pilot, "placeholder_token", "striped-ball")
        await _set(pilot, "train_data_dir", str(object_images))
        assert (_value(app, "snr_gamma"), _value(app, "max_embedding_norm")) == ("", "")
        assert (_value(app, "eval_loss"), _value(app, "save_best")) == (True, False)
        await _set(pilot, "snr_gamma", "5")
        await _set(pilot, "max_embedding_norm", "0.4")
        app.query_one("#eval_loss", Checkbox).value = False
        app.query_one("#save_best", Checkbox).value = True
        await pilot.pause()
        await _press_ok(pilot)
        assert "needs the evaluation loss" in _problem(app, "save_best")
        assert app.phase == "form"

        app.query_one("#eval_loss", Checkbox).value = True
        app.query_one("#eval_loss").focus()
        await pilot.pause()
        # its description is six lines at 80 columns: the help area grows to show all of it
        assert app.query_one("#help").size.height == 6
        config = build_config(app.query_one(TrainingForm).options())
        chosen.update(
            snr_gamma=config.snr_gamma,
            max_embedding_norm=config.max_embedding_norm,
            eval_loss=config.eval_loss,
            save_best=config.save_best,
        )
        await pilot.press("escape")

    _drive(app, script)
    assert chosen == {
        "snr_gamma": 5.0,
        "max_embedding_norm": 0.4,
        "eval_loss": True,
        "save_best": True,
    }
    assert not (host_root / "text-inversion-output").exists()


def test_the_compile_choice_reaches_the_config(host_root: Path, object_images: Path) -> None:
    """--torch_compile is a choice in the form, off until the user picks a mode."""
    app = _form(host_root)
    chosen: list[str] = []

    async def script(pilot: Pilot[None]) -> None:
        await _set(pilot, "placeholder_token", "striped-ball")
        await _set(pilot, "train_data_dir", str(object_images))
        assert _value(app, "torch_compile") == "off"
        app.query_one("#torch_compile", Select).value = "reduce-overhead"
        await pilot.pause()
        chosen.append(build_config(app.query_one(TrainingForm).options()).torch_compile)
        await pilot.press("escape")

    _drive(app, script)
    assert chosen == ["reduce-overhead"]


async def _small_run(pilot: Pilot[None], data: Path) -> None:
    """Type the settings of a tiny, quick run."""
    await _set(pilot, "placeholder_token", "striped-ball")
    await _set(pilot, "initializer_token", "ball")
    await _set(pilot, "train_data_dir", str(data))
    await _set(pilot, "max_train_steps", "2")
    await _set(pilot, "train_batch_size", "2")
    pilot.app.query_one("#mixed_precision", Select).value = "no"
    pilot.app.query_one("#enable_xformers_memory_efficient_attention", Checkbox).value = False
    await pilot.pause()


@pytest.mark.slow
def test_ok_trains_to_the_end_and_registers_the_embedding(
    host_root: Path, object_images: Path, artifacts: Path
) -> None:
    app = _form(host_root)

    async def script(pilot: Pilot[None]) -> None:
        await _small_run(pilot, object_images)
        await _set(pilot, "num_validation_images", "2")
        await _set(pilot, "validation_steps", "1")
        await _press_ok(pilot)
        await _wait_for_run(app, pilot)
        assert app.phase == "done", _value(app, "placeholder_token")
        await _screenshots(pilot, artifacts, "progress-finished")
        stats = str(app.query_one("#stats", Static).render())
        assert stats.startswith("step 2/2") and "loss" in stats and "it/s" in stats
        sample = str(app.query_one("#sample", Static).render())
        output = host_root / "text-inversion-output" / "striped-ball"
        assert sample == f"Latest samples: {output / 'samples' / 'step-000002.png'}"
        # a grid of the 2 images asked for, drawn every step
        for step in (1, 2):
            with Image.open(output / "samples" / f"step-00000{step}.png") as grid:
                assert grid.size == (2 * 64, 64)
        result = str(app.query_one("#result", Static).render())
        assert "InvokeAI: registered <striped-ball> (sd-1)" in result
        await pilot.press("q")

    _drive(app, script)
    assert app.return_code == 0
    assert [record.name for record in host_records(host_root)] == ["striped-ball"]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["escape", "ctrl+q"])
def test_a_stopped_run_saves_a_checkpoint_first(
    host_root: Path, object_images: Path, key: str
) -> None:
    """Esc stops and shows the outcome; Ctrl-Q stops, then quits once it is saved."""
    app = _form(host_root, num_validation_images=0)
    output = host_root / "text-inversion-output" / "striped-ball"

    async def script(pilot: Pilot[None]) -> None:
        await _small_run(pilot, object_images)
        await _set(pilot, "max_train_steps", "1000")
        await _press_ok(pilot)
        for _ in range(3000):  # until the first step is done (at most 5 minutes)
            if app.steps_seen or app.phase not in ("checking", "training"):
                break
            await pilot.pause(0.1)
        await pilot.press(key)
        if key == "escape":
            await _wait_for_run(app, pilot)
            assert "Stopped at step" in str(app.query_one("#result", Static).render())
            await pilot.press("escape")
        while app.return_code is None:  # Ctrl-Q: the app quits by itself once saved
            await asyncio.sleep(0.1)

    _drive(app, script)
    assert app.return_code == 130
    (checkpoint,) = list_checkpoints(output)
    assert int(checkpoint.name.removeprefix("checkpoint-")) < 1000
    assert not list(output.rglob("*.partial"))  # no half-written file
    assert host_records(host_root) == []  # a stopped run is not registered


def _open_headless(monkeypatch: pytest.MonkeyPatch, script: Script) -> list[TrainingApp]:
    """Make the form's `run` headless with `script` at the keyboard; returns the apps opened."""
    opened: list[TrainingApp] = []
    run = TrainingApp.run

    def headless(self: TrainingApp, **kwargs: Any) -> None:
        opened.append(self)
        return run(self, headless=True, size=SIZES[0], auto_pilot=script)

    monkeypatch.setattr(TrainingApp, "run", headless)
    return opened


def test_the_launchers_menu_entry_opens_the_form(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host_root: Path
) -> None:
    """The real launcher, its menu built from the plugin entry points, typed answers."""
    shown: dict[str, object] = {}

    async def look_and_leave(pilot: Pilot[None]) -> None:
        await pilot.pause()
        listing = pilot.app.query_one("#model", OptionList)
        prompts = [str(listing.get_option_at_index(i).prompt) for i in range(listing.option_count)]
        focused = pilot.app.focused
        shown.update(focused=focused and focused.id, models=[text.split()[0] for text in prompts])
        await pilot.press("escape")

    opened = _open_headless(monkeypatch, look_and_leave)
    monkeypatch.delenv("INVOKEAI_ROOT", raising=False)  # the launcher sets it; restored after
    monkeypatch.setattr(sys, "stdin", io.StringIO("9\n2\n4\n"))  # wrong, the form, quit
    assert launcher.main([f"--root={host_root}"]) == 0
    menu = capsys.readouterr().out
    assert "2. textual inversion training" in menu and "4. quit" in menu
    assert "'9' is not on the menu." in menu
    (app,) = opened
    assert app.root.resolve() == host_root.resolve()
    names = [model.name for model in installed_models_at(host_root)]
    assert shown == {"focused": "model", "models": names}  # the form, at its first field


def test_gui_option_opens_the_form_with_the_command_lines_values(
    monkeypatch: pytest.MonkeyPatch, host_root: Path
) -> None:
    shown: dict[str, object] = {}

    async def look_and_leave(pilot: Pilot[None]) -> None:
        await pilot.pause()
        app = pilot.app
        assert isinstance(app, TrainingApp)
        chosen = app.query_one(TrainingForm).chosen_model()
        shown.update(model=chosen and chosen.name, steps=_value(app, "max_train_steps"))
        await pilot.press("escape")

    opened = _open_headless(monkeypatch, look_and_leave)
    assert main(["--gui", f"--root={host_root}", "--model=tiny-sd-2", "--max_train_steps=7"]) == 0
    (app,) = opened
    assert app.root == host_root
    assert shown == {"model": "tiny-sd-2", "steps": "7"}


def test_gui_without_an_invokeai_root_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["--gui", f"--root={tmp_path}"]) == 2
    assert "no InvokeAI installation at" in capsys.readouterr().err
