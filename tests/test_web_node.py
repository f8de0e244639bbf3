"""The plugin contract and the web UI's pieces without a server: the self-contained node-pack
loader, the launcher's duck-typed menus, the shipped workflow, the board export, and the node's
fields. `test_web_node_e2e.py` runs them in the real `invokeai-web`."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from invokeai_ti_plugin.cli import install_nodes_main
from invokeai_ti_plugin.errors import UserInputError
from invokeai_ti_plugin.host.board_images import EXPORT_MARKER, export_board
from invokeai_ti_plugin.host.node_pack import (
    NODE_PACK_SOURCE,
    install_node_pack,
    node_pack_folder,
)
from invokeai_ti_plugin.launcher import plugin_menu_entries

from .conftest import write_image

FAKE_PLUGINS = '''
import json, os

RECORD = os.environ["FAKE_PLUGIN_RECORD"]


def note(what):
    with open(RECORD, "a") as file:
        file.write(json.dumps(what) + "\\n")


class Friendly:
    name = "friendly"
    menu_entries = [("say hello", lambda: 0)]

    def register_nodes(self):
        note("friendly registered its nodes")

    def on_host_startup(self, services):
        note(f"friendly started with {services}")


class Failing:
    name = "failing"

    def on_host_startup(self, services):
        raise RuntimeError("failing plugin")


FRIENDLY = Friendly()
FAILING = Failing()
'''


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path holding a distribution with three more `invokeai.plugins` entries:
    a friendly one, one failing at start-up and one that cannot be imported. Returns the file
    the friendly one writes what happens to it into."""
    site = tmp_path / "site"
    dist = site / "fake_plugins-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[invokeai.plugins]\n"
        "a-friendly = fake_plugin_module:FRIENDLY\n"
        "b-failing = fake_plugin_module:FAILING\n"
        "c-broken = no_such_module_anywhere:PLUGIN\n"
    )
    (site / "fake_plugin_module.py").write_text(FAKE_PLUGINS)
    record = tmp_path / "record.jsonl"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("FAKE_PLUGIN_RECORD", str(record))
    return record


def test_the_loader_needs_nothing_of_this_package(tmp_path: Path, fake_plugins: Path) -> None:
    """Installed in a root, the loader runs the other plugins' hooks even when this package
    cannot be imported (uninstalled); broken plugins are logged and skipped."""
    assert install_node_pack(tmp_path)
    pack = node_pack_folder(tmp_path) / "__init__.py"
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(ast.parse(pack.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in getattr(node, "names", [])
    }
    assert not [name for name in imported if name.startswith("invokeai_ti_plugin")]
    script = f"""
import importlib.util, json, sys

class Uninstalled:  # as if invokeai-ti-plugin had been uninstalled
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "invokeai_ti_plugin":
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, Uninstalled())
spec = importlib.util.spec_from_file_location("invokeai_plugins_loader", {str(pack)!r})
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)  # outside invokeai-web: registers nodes, wraps nothing
plugins = loader.load_plugins()
print(json.dumps([plugin.name for plugin in plugins]))
loader.run_startup_hooks(plugins, "the host's services")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["friendly", "failing"]
    assert "plugin c-broken could not be loaded" in done.stderr
    assert "plugin textual-inversion could not be loaded" in done.stderr
    assert "plugin failing failed at start-up" in done.stderr
    notes = [json.loads(line) for line in fake_plugins.read_text().splitlines()]
    # registered twice: when the pack was imported, and by the explicit call
    assert notes == ["friendly registered its nodes"] * 2 + [
        "friendly started with the host's services"
    ]


def test_an_old_loader_is_replaced_by_the_new_one(tmp_path: Path) -> None:
    pack = node_pack_folder(tmp_path) / "__init__.py"
    pack.parent.mkdir(parents=True)
    old = "from invokeai_ti_plugin.host.server_plugins import start_plugins_with_server\n"
    pack.write_text(old)
    assert install_node_pack(tmp_path)
    assert pack.read_text() == NODE_PACK_SOURCE
    assert not install_node_pack(tmp_path)  # the same text is left alone


def test_a_node_pack_the_user_removed_stays_removed_until_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Training and the launcher install the pack once; InvokeAI's Custom Nodes tab uninstalls
    it by deleting its folder, and then only `invokeai-ti install-nodes` brings it back."""
    folder = node_pack_folder(tmp_path)
    folder.mkdir(parents=True)  # installed by a version that left no trace of it
    (folder / "__init__.py").write_text(NODE_PACK_SOURCE)
    assert not install_node_pack(tmp_path)  # as it is
    shutil.rmtree(folder)  # what the Custom Nodes tab's uninstall does
    with caplog.at_level(logging.INFO):
        assert not install_node_pack(tmp_path)
    assert not folder.exists()
    assert "the node pack was removed from" in caplog.text
    assert install_nodes_main([f"--root={tmp_path}"]) == 0
    assert (folder / "__init__.py").read_text() == NODE_PACK_SOURCE
    assert [path.name for path in folder.parent.iterdir() if path.is_dir()] == [folder.name]


def test_the_launcher_reads_any_plugins_menu_pairs(fake_plugins: Path) -> None:
    entries = plugin_menu_entries()
    assert [entry.label for entry in entries] == ["say hello", "textual inversion training"]
    assert entries[0].run() == 0


def test_the_shipped_workflow_is_valid_and_holds_the_nodes_defaults() -> None:
    from invokeai.app.services.workflow_records.workflow_records_common import (
        WorkflowWithoutIDValidator,
    )

    from invokeai_ti_plugin.host.training_node import TrainTextualInversionInvocation
    from invokeai_ti_plugin.host.workflow import shipped_workflow

    workflow = WorkflowWithoutIDValidator.validate_python(shipped_workflow())
    (node,) = workflow.nodes
    data = node["data"]
    assert isinstance(data, dict) and data["type"] == TrainTextualInversionInvocation.get_type()
    inputs = data["inputs"]
    assert isinstance(inputs, dict)
    fields = TrainTextualInversionInvocation.model_fields
    assert set(inputs) == set(fields) - {"id", "type", "is_intermediate", "use_cache"}
    for name, given in inputs.items():
        assert isinstance(given, dict)
        if "value" in given and name not in ("placeholder_token", "train_batch_size"):
            assert given["value"] == fields[name].default, name
    assert data["isIntermediate"] is False  # the editor's "Save To Gallery": the sample grid
    exposed = {field.fieldName for field in workflow.exposedFields}
    assert {"model", "placeholder_token", "board"} <= exposed


def test_the_nodes_fields_are_the_configs(make_config: Callable[..., Any]) -> None:
    from invokeai_ti_plugin.config import TrainingConfig
    from invokeai_ti_plugin.host.training_node import TrainTextualInversionInvocation

    fields = TrainTextualInversionInvocation.model_fields
    options = TrainingConfig.model_fields
    same_defaults = (
        "initializer_token",
        "num_vectors",
        "learnable_property",
        "max_train_steps",
        "optimizer",
        "validation_steps",
        "num_validation_images",
        "scale_lr",
        "lr_scheduler",
        "lr_warmup_steps",
        "gradient_accumulation_steps",
        "center_crop",
        "eval_loss",
        "save_best",
        "torch_compile",
    )
    for name in same_defaults:
        assert fields[name].default == options[name].default, name
    for name in ("model", "placeholder_token", "train_batch_size", *same_defaults[1:]):
        assert fields[name].description == options[name].description, name
    # each adds what its 0 or "" means
    for name in ("learning_rate", "validation_prompt", "snr_gamma", "max_embedding_norm"):
        assert (fields[name].description or "").startswith(options[name].description or "-")
    assert "holds the queue" in (TrainTextualInversionInvocation.__doc__ or "")


def test_the_nodes_inputs_are_the_command_lines_options(
    tmp_path: Path, object_images: Path
) -> None:
    """A learning rate of 0 is the optimizer's own default, as an omitted --learning_rate is;
    the rest passes through, and the config checks it as it checks the command line's."""
    from invokeai.app.invocations.model import ModelIdentifierField
    from invokeai.backend.model_manager.taxonomy import BaseModelType, ModelType

    from invokeai_ti_plugin.errors import UserInputError
    from invokeai_ti_plugin.host.training_node import TrainTextualInversionInvocation

    model = ModelIdentifierField(
        key="k", hash="h", name="tiny", base=BaseModelType.StableDiffusion1, type=ModelType.Main
    )

    def config(**inputs: Any) -> Any:
        node = TrainTextualInversionInvocation(
            id="n", model=model, placeholder_token="<striped-ball>", **inputs
        )
        return node.training_config(tmp_path, object_images)

    assert config().optimizer == "adamw" and config().learning_rate == 5e-4
    prodigy = config(optimizer="prodigy", validation_steps=50, num_validation_images=2)
    assert (prodigy.optimizer, prodigy.learning_rate) == ("prodigy", 1.0)
    assert (prodigy.validation_steps, prodigy.num_validation_images) == (50, 2)
    assert config(optimizer="prodigy", learning_rate=0.5).learning_rate == 0.5
    assert config().validation_prompt is None  # empty: the template the command line uses
    sushi = "a plate of sushi in <striped-ball> style"
    assert config(validation_prompt=f" {sushi}\n").validation_prompt == sushi
    with pytest.raises(UserInputError, match="--learning_rate: must be a positive number"):
        config(learning_rate=-1.0)
    # the manual's form's options, as the terminal form has them
    assert (config().scale_lr, config().center_crop) == (True, False)
    tuned = config(
        scale_lr=False,
        lr_scheduler="cosine",
        lr_warmup_steps=100,
        gradient_accumulation_steps=4,
        center_crop=True,
    )
    assert (tuned.scale_lr, tuned.lr_scheduler, tuned.lr_warmup_steps) == (False, "cosine", 100)
    assert (tuned.gradient_accumulation_steps, tuned.center_crop) == (4, True)
    # the convergence options: 0 is off, as an omitted option is
    assert (config().snr_gamma, config().max_embedding_norm) == (None, None)
    assert (config().eval_loss, config().save_best) == (True, False)
    converging = config(snr_gamma=5.0, max_embedding_norm=0.4, save_best=True)
    assert (converging.snr_gamma, converging.max_embedding_norm) == (5.0, 0.4)
    assert converging.save_best and converging.eval_loss
    assert not config(eval_loss=False).eval_loss
    with pytest.raises(UserInputError, match="--snr_gamma: must be a positive number"):
        config(snr_gamma=-5.0)
    with pytest.raises(UserInputError, match="--max_embedding_norm: must be a positive number"):
        config(max_embedding_norm=-0.4)
    with pytest.raises(UserInputError, match="--save_best: needs the evaluation loss"):
        config(eval_loss=False, save_best=True)
    # what the GPU figures found pays on long runs on a fast GPU
    assert config().torch_compile == "off"
    assert config(torch_compile="reduce-overhead").torch_compile == "reduce-overhead"


def _workflow_services(host_root: Path) -> Any:
    """The host's real workflow library on the root's SQLite database, as the server has it."""
    from invokeai.app.services.image_files.image_files_disk import DiskImageFileStorage
    from invokeai.app.services.shared.sqlite.sqlite_util import init_db
    from invokeai.app.services.workflow_records.workflow_records_sqlite import (
        SqliteWorkflowRecordsStorage,
    )
    from invokeai.backend.util.logging import InvokeAILogger

    from invokeai_ti_plugin.host.app_config import use_root

    config = use_root(host_root)
    db = init_db(config, InvokeAILogger.get_logger(), DiskImageFileStorage(host_root / "i"))
    return SimpleNamespace(configuration=config, workflow_records=SqliteWorkflowRecordsStorage(db))


def test_the_workflow_is_added_to_the_library_once(host_root: Path) -> None:
    from invokeai.app.services.shared.sqlite.sqlite_common import SQLiteDirection
    from invokeai.app.services.workflow_records.workflow_records_common import (
        WorkflowRecordOrderBy,
    )

    from invokeai_ti_plugin.host.workflow import fingerprint, marker_path, sync_workflow

    services = _workflow_services(host_root)
    library = services.workflow_records

    def ours() -> list[str]:
        found = library.get_many(
            WorkflowRecordOrderBy.Name, SQLiteDirection.Ascending, None, 0, None,
            "Train Textual Inversion", None, None,
        )  # fmt: skip
        return [item.workflow_id for item in found.items]

    added = sync_workflow(services)
    assert added is not None and ours() == [added]
    stored = library.get(added).workflow
    remembered = {"workflow_added": added, "fingerprint": fingerprint(stored)}
    assert json.loads(marker_path(services).read_text()) == remembered
    assert sync_workflow(services) is None
    library.delete(added)
    assert sync_workflow(services) is None and ours() == []
    # without the marker (a library it never met): added, but never beside one of its name
    marker_path(services).unlink()
    again = sync_workflow(services)
    assert again is not None and ours() == [again]
    marker_path(services).unlink()
    assert sync_workflow(services) is None and ours() == [again]
    assert json.loads(marker_path(services).read_text()) == {"workflow_added": "already there"}


def test_an_untouched_workflow_is_brought_up_to_date_and_an_edited_one_kept(
    host_root: Path,
) -> None:
    """A plugin update replaces the copy an older version added, unless the user changed it."""
    from invokeai_ti_plugin.host.workflow import (
        fingerprint,
        marker_path,
        shipped_workflow,
        sync_workflow,
    )

    services = _workflow_services(host_root)
    library = services.workflow_records
    added = sync_workflow(services)
    assert added is not None
    current = library.get(added).workflow
    marker = marker_path(services)

    def as_an_older_plugin_added_it() -> None:
        older = current.model_copy(update={"version": "0.9.0", "notes": "older notes"})
        stored = library.update(older).workflow
        marker.write_text(json.dumps({"workflow_added": added, "fingerprint": fingerprint(stored)}))

    as_an_older_plugin_added_it()
    assert sync_workflow(services) == added
    refreshed = library.get(added).workflow
    assert (refreshed.version, refreshed.notes) == (shipped_workflow()["version"], current.notes)
    assert json.loads(marker.read_text())["fingerprint"] == fingerprint(refreshed)
    assert sync_workflow(services) is None  # up to date

    # the user's own notes in an older copy are kept
    as_an_older_plugin_added_it()
    edited = library.get(added).workflow.model_copy(update={"notes": "my own notes"})
    library.update(edited)
    assert sync_workflow(services) is None
    assert library.get(added).workflow.notes == "my own notes"

    # with a marker of a version that kept no fingerprint, or an unreadable one, nothing tells
    # an untouched copy from an edited one: left alone
    for kept in (json.dumps({"workflow_added": added}), "{not json"):
        as_an_older_plugin_added_it()
        marker.write_text(kept)
        assert sync_workflow(services) is None
        assert library.get(added).workflow.notes == "older notes"


def test_a_board_is_exported_byte_for_byte_and_only_into_folders_of_ours(tmp_path: Path) -> None:
    stored = tmp_path / "outputs"
    stored.mkdir()
    images = {f"{n}.png": write_image(stored / f"{n}.png", size=(40 + n, 30)) for n in range(3)}
    root = tmp_path / "root"
    folder = export_board(root, "ball", "my board", images)
    assert folder == root / "text-inversion-training-data" / "ball"
    copies = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != EXPORT_MARKER}
    assert copies == {name: path.read_bytes() for name, path in images.items()}
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    # the same board again: nothing rewritten; an image taken off the board goes
    assert export_board(root, "ball", "my board", images) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".png"} == {
        name: mtime for name, mtime in before.items() if name.endswith(".png")
    }
    del images["0.png"]
    export_board(root, "ball", "my board", images)
    assert sorted(p.name for p in folder.glob("*.png")) == ["1.png", "2.png"]

    # the user's own pictures in the default folder are never touched
    own = root / "text-inversion-training-data" / "cat"
    own.mkdir()
    mine = write_image(own / "mine.png").read_bytes()
    elsewhere = export_board(root, "cat", "my board", images)
    assert elsewhere == own.with_name("cat-board")
    assert [p.name for p in own.iterdir()] == ["mine.png"]
    assert (own / "mine.png").read_bytes() == mine
    (own.with_name("cat-board") / EXPORT_MARKER).unlink()
    with pytest.raises(UserInputError, match="hold pictures of your own"):
        export_board(root, "cat", "my board", images)

    with pytest.raises(UserInputError) as empty:
        export_board(root, "dog", "empty", {})
    assert str(empty.value) == (
        "--board: board 'empty' holds no images; add 3-20 pictures of your subject to it"
    )
    assert not (root / "text-inversion-training-data" / "dog").exists()
