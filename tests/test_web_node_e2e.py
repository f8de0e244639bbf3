"""End to end on the real `invokeai-web`: the "Train Textual Inversion" node, driven as the web
UI drives it (REST and socket.io), on a board of uploaded pictures: progress, cancel with a
checkpoint, resume to the end, the embedding used by the next generation, the ready workflow in
the library, and bad input failing only its own queue item."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import pytest
import requests
import socketio
import torch
from PIL import Image
from safetensors.torch import load_file

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.host.board_images import EXPORT_MARKER

from .conftest import Server, host_cli_args, running_server, save_tensors

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.slow

STEPS = 300


@pytest.fixture
def server(host_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    assert main(["install-nodes", f"--root={host_root}"]) == 0
    log_path = tmp_path / "server.log"
    with running_server(host_root, log_path, monkeypatch) as running:
        yield running
    assert "failed at start-up" not in log_path.read_text()


class ProgressEvents:
    """The queue's `invocation_progress` events, as the web UI receives them."""

    def __init__(self, server: Server) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        self.client = socketio.Client()
        self.client.on("invocation_progress", self._add)
        # the web UI's transport (long polling trips over the host's gzip middleware)
        self.client.connect(server.address, socketio_path="/ws/socket.io", transports=["websocket"])
        self.client.emit("subscribe_queue", {"queue_id": "default"})

    def _add(self, event: dict[str, Any]) -> None:
        with self.arrived:
            self.events.append(event)
            self.arrived.notify_all()

    def of(self, item_id: int) -> list[dict[str, Any]]:
        with self.arrived:
            return [event for event in self.events if event["item_id"] == item_id]

    def wait_for_training(self, item_id: int, timeout: float = 120) -> dict[str, Any]:
        """The first event of `item_id` that reports a training step."""
        with self.arrived:
            found = self.arrived.wait_for(
                lambda: [e for e in self.of(item_id) if e.get("percentage")], timeout
            )
        assert found, f"no training progress for item {item_id}: {self.of(item_id)}"
        return found[0]


def _board_with(server: Server, name: str, pictures: list[Path]) -> str:
    board_id = server.call("POST", f"/api/v1/boards/?board_name={quote(name)}")["board_id"]
    for picture in pictures:
        with picture.open("rb") as file:
            response = requests.post(
                f"{server.address}/api/v1/images/upload",
                params={"image_category": "user", "is_intermediate": "false", "board_id": board_id},
                files={"file": (picture.name, file, "image/png")},
                headers=server.auth,
                timeout=60,
            )
        response.raise_for_status()
    return str(board_id)


def _wait_until_idle(server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while server.call("GET", "/api/v1/queue/default/status")["processor"]["is_processing"]:
        assert time.monotonic() < deadline, "the canceled node did not stop"
        time.sleep(0.3)


def _train(server: Server, model: dict[str, Any], board_id: str, **options: Any) -> int:
    node = {
        "type": "train_textual_inversion",
        "model": model,
        "placeholder_token": "<board-ball>",
        "initializer_token": "ball",
        "board": {"board_id": board_id},
        "max_train_steps": STEPS,
        "train_batch_size": 1,
        "learning_rate": 0.05,
        "resolution": 64,
        "seed": 3,
        **options,
    }
    return server.enqueue({"train": node}, [])


def test_the_training_node_in_the_web_ui(
    server: Server, host_root: Path, object_images: Path
) -> None:
    # the node is in the schema the workflow editor reads, the workflow in the library
    schema = server.call("GET", "/openapi.json")
    assert "TrainTextualInversionInvocation" in schema["components"]["schemas"]
    listed = server.call("GET", "/api/v1/workflows/?query=Train%20Textual%20Inversion")["items"]
    assert [item["name"] for item in listed] == ["Train Textual Inversion"]

    model = server.main_model("tiny-sd-1")
    pictures = sorted(object_images.glob("*.png"))
    board_id = _board_with(server, "striped ball", pictures)
    progress = ProgressEvents(server)
    try:
        # cancel mid-run: a checkpoint and the embedding so far, nothing registered
        first = _train(server, model, board_id)
        seen = progress.wait_for_training(first)
        assert "Training <board-ball>: step " in seen["message"] and "loss" in seen["message"]
        assert "left" in seen["message"]
        server.call("PUT", f"/api/v1/queue/default/i/{first}/cancel")
        assert server.wait(first)["status"] == "canceled"
        _wait_until_idle(server)  # the item is canceled at once; its node stops after a step
        out = host_root / "text-inversion-output" / "board-ball"
        (checkpoint,) = (out / "checkpoints").iterdir()
        stopped_at = int(checkpoint.name.removeprefix("checkpoint-"))
        assert 0 < stopped_at < STEPS
        assert json.loads((out / "embedding.json").read_text())["steps"] == stopped_at
        assert "board-ball" not in server.embeddings()

        # the board's pictures were exported byte for byte into a folder of the plugin's
        data = host_root / "text-inversion-training-data" / "board-ball"
        exported = sorted(p for p in data.iterdir() if p.name != EXPORT_MARKER)
        assert len(exported) == len(pictures)
        stored = {p.read_bytes() for p in exported}

        # again, resume on: continues from the checkpoint to the end and registers
        second = _train(server, model, board_id)
        item = server.wait(second)
        assert item["status"] == "completed", item.get("error_traceback")
        assert {p.read_bytes() for p in data.iterdir() if p.name != EXPORT_MARKER} == stored
        (node_id,) = item["session"]["source_prepared_mapping"]["train"]
        result = item["session"]["results"][node_id]
        assert result["trigger"] == "<board-ball>"
        assert result["embedding"]["name"] == "board-ball"
        assert result["embedding"]["base"] == "sd-1"
        # the last sample grid (4 images in a row) is in the gallery, not in the training board
        grid = server.call("GET", f"/api/v1/images/i/{result['samples']['image_name']}")
        assert (grid["width"], grid["height"], grid["board_id"]) == (4 * 64, 64, None)
        assert grid["is_intermediate"] is False
        # and the loss plot beside it, the run folder's loss.png
        plot = server.call("GET", f"/api/v1/images/i/{result['loss_plot']['image_name']}")
        with Image.open(out / "loss.png") as drawn:
            assert (plot["width"], plot["height"], plot["board_id"]) == (*drawn.size, None)
        board_images = server.call("GET", f"/api/v1/boards/{board_id}/image_names")
        assert grid["image_name"] not in board_images and len(board_images) == len(pictures)
        assert plot["image_name"] not in board_images
        assert f"resuming from {checkpoint} at step {stopped_at}" in (
            out / "logs" / "train.log"
        ).read_text()
        history = (out / "logs" / "history.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in history]
        assert steps == list(range(1, STEPS + 1))
        assert json.loads((out / "embedding.json").read_text())["steps"] == STEPS
        assert server.embeddings() == {"board-ball": "sd-1"}
        # the model manager shows the embedding with its first sample as cover image
        listed = server.call("GET", "/api/v2/models/?model_type=embedding")["models"]
        (cover_url,) = [model["cover_image"] for model in listed if model["name"] == "board-ball"]
        cover = server.call("GET", "/" + cover_url.removeprefix(server.address).lstrip("/"))
        assert cover[:4] == b"RIFF" and cover[8:12] == b"WEBP"
        # and related to the model it was trained on, for the pickers' "related" filter
        embedding_key = result["embedding"]["key"]
        related = server.call("GET", f"/api/v1/model_relationships/i/{embedding_key}")
        assert related == [model["key"]]
        # the training's own events (InvokeAI adds "Saving image" for the gallery copy)
        events = [e for e in progress.of(second) if e["message"].startswith("Training")]
        assert events[-1]["percentage"] == 1.0
        assert events[-1]["image"] is not None  # the sample grid drawn when the first run stopped
        assert any(e["message"].startswith(f"Training <board-ball>: step {STEPS}/") for e in events)
        # once more with no samples: the folder's older grid is not posted as this run's
        again = server.wait(_train(server, model, board_id, num_validation_images=0))
        assert again["status"] == "completed", again.get("error_traceback")
        (again_id,) = again["session"]["source_prepared_mapping"]["train"]
        assert again["session"]["results"][again_id].get("samples") is None  # None: left out
        assert again["session"]["results"][again_id]["loss_plot"]["image_name"] != (
            result["loss_plot"]["image_name"]
        )
    finally:
        progress.client.disconnect()

    # the next generation uses it: the same vectors under another name give the same picture
    trained = host_root / "embeddings" / "board-ball" / "sd-1" / "learned_embeds.safetensors"
    assert main(["import", str(trained), "--name=board-twin", f"--root={host_root}"]) == 0
    ball = server.generate(model, "a photo of a <board-ball>")
    assert np.array_equal(ball, server.generate(model, "a photo of a <board-twin>"))
    assert not np.array_equal(ball, server.generate(model, "a photo of a board-ball"))

    # an empty board fails only its own item, with the command line's one-line message
    empty = _board_with(server, "empty", [])
    failed = server.wait(_train(server, model, empty, placeholder_token="<nothing>"))
    assert failed["status"] == "failed"
    assert failed["error_message"] == (
        "--board: board 'empty' holds no images; add 3-20 pictures of your subject to it"
    )
    assert not (host_root / "text-inversion-training-data" / "nothing").exists()
    # a trigger the model already knows, the same message as the command line
    known = server.wait(_train(server, model, board_id, placeholder_token="ball"))
    assert known["status"] == "failed" and "ball" in known["error_message"]
    assert "\n" not in known["error_message"]
    assert np.array_equal(ball, server.generate(model, "a photo of a <board-ball>"))

    # a folder wins over a board, which the editor fills in for a Board left on Auto (with the
    # auto-add board); with neither, one line. The convergence options reach the run
    by_folder = _train(
        server,
        model,
        board_id,
        placeholder_token="<dir-ball>",
        train_data_dir=str(object_images),
        snr_gamma=5.0,
        max_embedding_norm=0.5,
        save_best=True,
    )
    assert server.wait(by_folder)["status"] == "completed"
    summary = host_root / "text-inversion-output" / "dir-ball" / "embedding.json"
    options = json.loads(summary.read_text())["options"]
    assert options["train_data_dir"] == str(object_images)
    assert (options["snr_gamma"], options["max_embedding_norm"]) == (5.0, 0.5)
    assert (summary.parent / "learned_embeds-best.safetensors").is_file()
    # the limit is below the initializer's norm (0.547), so it held every update
    registered = host_root / "embeddings" / "dir-ball" / "sd-1" / "learned_embeds.safetensors"
    assert load_file(registered)["emb_params"].norm(dim=-1).max() <= 0.5 + 1e-6
    assert not (host_root / "text-inversion-training-data" / "dir-ball").exists()
    neither = server.wait(_train(server, model, board_id, board=None, placeholder_token="<no>"))
    assert neither["error_message"] == (
        "--board: choose the board whose pictures to train on (or give a train_data_dir)"
    )


PASSWORD = "Textual-Inversion-7"


def test_in_multiuser_mode_only_an_administrator_trains(
    host_root: Path,
    object_images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """InvokeAI's multiuser mode lets only administrators add or replace models. Training
    registers an embedding, replaces an earlier run of its trigger and reads server folders,
    so a user's node fails in one line before anything is written; an administrator's runs.
    The command line (the server's own files) registers, and says the server's caches are
    an administrator's to empty."""
    assert main(["install-nodes", f"--root={host_root}"]) == 0
    monkeypatch.setenv("INVOKEAI_MULTIUSER", "true")
    with running_server(host_root, tmp_path / "server.log", monkeypatch) as server:
        account = {"email": "admin@example.com", "password": PASSWORD}
        server.call("POST", "/api/v1/auth/setup", account)
        admin = server.login("admin@example.com", PASSWORD)
        account = {"email": "user@example.com", "password": PASSWORD}
        admin.call("POST", "/api/v1/auth/users", account)
        user = server.login("user@example.com", PASSWORD)
        model = user.main_model("tiny-sd-1")
        board_id = _board_with(user, "my ball", sorted(object_images.glob("*.png")))
        refused = (
            "training adds an embedding to InvokeAI's models, which in multiuser mode only an "
            "administrator may do; ask an administrator to train it"
        )
        by_board = user.wait(_train(user, model, board_id))
        others_images = str(host_root / "outputs" / "images")
        by_folder = user.wait(_train(user, model, board_id, train_data_dir=others_images))
        for item in (by_board, by_folder):
            assert (item["status"], item["error_message"]) == ("failed", refused)
        assert not (host_root / "text-inversion-training-data" / "board-ball").exists()
        assert not (host_root / "text-inversion-output" / "board-ball").exists()
        assert admin.embeddings() == {}
        # an administrator passes: the board's own problem is what stops this one
        empty = _board_with(admin, "empty", [])
        failed = admin.wait(_train(admin, model, empty))
        assert failed["error_message"] == (
            "--board: board 'empty' holds no images; add 3-20 pictures of your subject to it"
        )

        vectors = save_tensors(tmp_path / "ball.safetensors", {"emb_params": torch.randn(1, 768)})
        with caplog.at_level(logging.WARNING):
            assert main(["import", str(vectors), "--name=shared-ball", f"--root={host_root}"]) == 0
        assert "lets only a logged-in administrator empty its caches" in caplog.text
        assert "refused" not in caplog.text
        assert admin.embeddings() == {"shared-ball": "sd-1"}


NODE_LABELS = [
    "Model", "Placeholder Token", "Initializer Token", "Num Vectors", "Learnable Property",
    "Board", "Train Data Dir", "Max Train Steps", "Optimizer", "Learning Rate", "Scale LR",
    "LR Scheduler", "LR Warmup Steps", "Min-SNR Gamma", "Max Embedding Norm",
    "Train Batch Size", "Gradient Accumulation Steps", "Torch Compile", "Validation Steps",
    "Num Validation Images", "Eval Loss", "Save Best", "Validation Prompt", "Resolution",
    "Center Crop", "Seed", "Resume", "Embedding", "Trigger", "Samples", "Loss Plot",
]  # fmt: skip
CHROMIUM = Path("/usr/bin/chromium")
# CI installs Chromium (.ci/run) and must run these; a local run without it skips
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="no Chromium at /usr/bin/chromium (apt install chromium)",
)


@contextmanager
def web_ui(server: Server, width: int = 1600) -> Iterator[Page]:
    """The server's web UI, open in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.goto(server.address)
            yield page
        finally:
            browser.close()


@needs_chromium
def test_a_browser_loads_the_workflow_and_shows_the_node(server: Server, tmp_path: Path) -> None:
    """The real web UI in headless Chromium: the library holds the workflow, and loading it
    puts the node, with every field, in the workflow editor. INVOKEAI_TI_SCREENSHOT=PATH keeps
    the screenshot (docs/web-node.png is made so)."""
    shot = Path(os.environ.get("INVOKEAI_TI_SCREENSHOT", tmp_path / "web-node.png"))
    with web_ui(server) as page:
        page.locator("[aria-label='Workflows']").first.click()
        page.get_by_text("Browse Workflow Templates").click()
        page.get_by_text("Your Workflows").click()
        page.get_by_text("Train Textual Inversion").first.click()
        page.get_by_role("button", name="Load", exact=True).click()
        page.get_by_text("Workflow Editor", exact=True).click()
        page.locator("button[aria-label='Fit View']").click()
        node = page.locator(".react-flow__node").filter(has_text="Train Textual Inversion")
        node.wait_for()
        page.wait_for_timeout(1000)  # the fit-view animation
        page.screenshot(path=str(shot))
        shown = node.inner_text()
    lines = {line.strip() for line in shown.splitlines()}
    assert "Train Textual Inversion" in lines
    assert [label for label in NODE_LABELS if label not in lines] == []
    assert shot.stat().st_size > 10_000


@needs_chromium
def test_a_browser_shows_a_trained_word_in_the_model_manager(
    server: Server, host_root: Path, object_images: Path, tmp_path: Path
) -> None:
    """Trained from the command line beside the running server, the embedding appears in the
    web UI's model manager with its first sample as picture, what it was trained on, and the
    model it is related to."""
    args = host_cli_args(host_root, object_images, "tiny-sd-1", "--num_validation_images=1")
    assert main(args) == 0
    shot = Path(os.environ.get("INVOKEAI_TI_MODELS_SCREENSHOT", tmp_path / "model-manager.png"))
    with web_ui(server, width=1500) as page:
        # the "What's New" popover covers the tab bar: click through it
        page.locator("[aria-label='Models']").first.dispatch_event("click")
        page.get_by_text("striped-ball", exact=True).first.dispatch_event("click")
        page.get_by_text("trained on tiny-sd-1 for 2 steps").last.wait_for()
        page.wait_for_timeout(1000)  # the cover image loading
        page.screenshot(path=str(shot))
        covers = page.locator("img[src*='/image']")
        loaded = covers.evaluate_all("images => images.map(i => i.complete && i.naturalWidth)")
        named = page.get_by_text("tiny-sd-1", exact=True).count()
    assert loaded and all(width == 64 for width in loaded), loaded  # list and details
    assert named == 2  # the main model's list entry, and its chip under Related Models
    assert shot.stat().st_size > 10_000
