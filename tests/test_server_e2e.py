"""End to end against the real `invokeai-web` on 127.0.0.1: start-up registration, training while
it runs, and text-to-image generations through its queue that use the `<trigger>` embedding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from invokeai_ti_plugin.cli import main

from .conftest import Server, host_cli_args, running_server

pytestmark = pytest.mark.slow


@pytest.fixture
def server(host_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """`invokeai-web` on the test root, with embeddings dropped in while it was down."""
    # embeddings dropped in while the host was down, to be registered at start-up: two names
    # for the same vector, so that identical images prove the host applied them
    vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(0))
    for name in ("dropped-ball", "dropped-twin"):
        dropped = host_root / "embeddings" / name / "learned_embeds.safetensors"
        dropped.parent.mkdir(parents=True)
        save_file({"emb_params": vector}, dropped)
    assert main(["install-nodes", f"--root={host_root}"]) == 0
    log_path = tmp_path / "server.log"
    with running_server(host_root, log_path, monkeypatch) as running:
        yield running
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
    first = host_cli_args(host_root, object_images, "tiny-sd-1", "--seed=1", "--learning_rate=0.05")
    assert main(first) == 0
    assert server.embeddings() == {**dropped, "striped-ball": "sd-1"}
    trained = server.generate(model, "a photo of a <striped-ball>")

    # retraining the trigger while the server runs changes what the prompt produces
    again = host_cli_args(
        host_root, object_images, "tiny-sd-1", "--seed=2", "--overwrite", "--learning_rate=0.05"
    )
    assert main(again) == 0
    assert server.embeddings() == {**dropped, "striped-ball": "sd-1"}
    retrained = server.generate(model, "a photo of a <striped-ball>")
    assert not np.array_equal(retrained, trained), "the server kept the old vectors"
