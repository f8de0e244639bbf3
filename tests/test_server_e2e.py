"""End to end against the real `invokeai-web` on 127.0.0.1: start-up registration, training while
it runs, and text-to-image generations through its queue that use the `<trigger>` embedding."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from invokeai_ti_plugin.cli import main

from .test_host import _train_args

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, address: str) -> None:
        self.address = address

    def call(self, method: str, route: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.address + route,
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if payload[:1] in (b"{", b"[") else payload

    def embeddings(self) -> dict[str, str]:
        models = self.call("GET", "/api/v2/models/?model_type=embedding")["models"]
        return {model["name"]: model["base"] for model in models}

    def main_model(self, name: str) -> dict[str, Any]:
        models = self.call("GET", "/api/v2/models/?model_type=main")["models"]
        (model,) = [model for model in models if model["name"] == name]
        return {key: model[key] for key in ("key", "hash", "name", "base", "type")}

    def generate(self, model: dict[str, Any], prompt: str) -> np.ndarray:
        """A 64x64 text-to-image run through the queue, nodes cached as the web UI has them."""
        nodes = {
            "model": {"type": "main_model_loader", "model": model},
            "pos": {"type": "compel", "prompt": prompt},
            "neg": {"type": "compel", "prompt": ""},
            "noise": {"type": "noise", "seed": 7, "width": 64, "height": 64, "use_cpu": True},
            "denoise": {
                "type": "denoise_latents",
                "steps": 3,
                "cfg_scale": 7.5,
                "scheduler": "ddim",
                "denoising_start": 0.0,
                "denoising_end": 1.0,
            },
            "l2i": {"type": "l2i", "fp32": True, "is_intermediate": False},
        }
        for node_id, node in nodes.items():
            node["id"] = node_id
        links = [
            ("model", "clip", "pos", "clip"),
            ("model", "clip", "neg", "clip"),
            ("model", "unet", "denoise", "unet"),
            ("pos", "conditioning", "denoise", "positive_conditioning"),
            ("neg", "conditioning", "denoise", "negative_conditioning"),
            ("noise", "noise", "denoise", "noise"),
            ("denoise", "latents", "l2i", "latents"),
            ("model", "vae", "l2i", "vae"),
        ]
        edges = [
            {"source": {"node_id": a, "field": b}, "destination": {"node_id": c, "field": d}}
            for a, b, c, d in links
        ]
        graph = {"id": str(uuid.uuid4()), "nodes": nodes, "edges": edges}
        batch = {"batch": {"graph": graph, "runs": 1}, "prepend": False}
        (item_id,) = self.call("POST", "/api/v1/queue/default/enqueue_batch", batch)["item_ids"]
        deadline = time.monotonic() + 180
        while True:
            item = self.call("GET", f"/api/v1/queue/default/i/{item_id}")
            if item["status"] in ("completed", "failed", "canceled"):
                break
            assert time.monotonic() < deadline, "generation did not finish"
            time.sleep(0.5)
        assert item["status"] == "completed", item.get("error_traceback")
        session = item["session"]
        (l2i,) = session["source_prepared_mapping"]["l2i"]
        name = session["results"][l2i]["image"]["image_name"]
        png = self.call("GET", f"/api/v1/images/i/{name}/full")
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server(host_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """`invokeai-web` on the test root; stopped by its process id."""
    # embeddings dropped in while the host was down, to be registered at start-up: two names
    # for the same vector, so that identical images prove the host applied them
    vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(0))
    for name in ("dropped-ball", "dropped-twin"):
        dropped = host_root / "embeddings" / name / "learned_embeds.safetensors"
        dropped.parent.mkdir(parents=True)
        save_file({"emb_params": vector}, dropped)
    assert main(["install-nodes", f"--root={host_root}"]) == 0

    port = _free_port()
    monkeypatch.setenv("INVOKEAI_HOST", "127.0.0.1")
    monkeypatch.setenv("INVOKEAI_PORT", str(port))
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "invokeai-web"), "--root", str(host_root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        running = None
        while running is None:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            running = re.search(
                r"Invoke running on (http://127\.0\.0\.1:\d+)", log_path.read_text()
            )
            time.sleep(0.5)
        yield Server(running.group(1))
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "failed at start-up" not in log_path.read_text()


def test_the_web_ui_sees_and_uses_the_embeddings(
    server: Server, host_root: Path, object_images: Path
) -> None:
    dropped = {"dropped-ball": "sd-1", "dropped-twin": "sd-1"}
    assert server.embeddings() == dropped
    model = server.main_model("tiny-sd-1")
    ball = server.generate(model, "a photo of a <dropped-ball>")
    twin = server.generate(model, "a photo of a <dropped-twin>")
    assert np.array_equal(ball, twin), "the triggers were not replaced by their (equal) vectors"
    assert not np.array_equal(ball, server.generate(model, "a photo of a dropped-ball"))

    # train and register while the server runs: listed without a restart
    assert (
        main(_train_args(host_root, object_images, "tiny-sd-1", "--seed=1", "--learning_rate=0.05"))
        == 0
    )
    assert server.embeddings() == {**dropped, "striped-ball": "sd-1"}
    trained = server.generate(model, "a photo of a <striped-ball>")

    # retraining the trigger while the server runs changes what the prompt produces
    again = _train_args(
        host_root, object_images, "tiny-sd-1", "--seed=2", "--overwrite", "--learning_rate=0.05"
    )
    assert main(again) == 0
    assert server.embeddings() == {**dropped, "striped-ball": "sd-1"}
    retrained = server.generate(model, "a photo of a <striped-ball>")
    assert not np.array_equal(retrained, trained), "the server kept the old vectors"
