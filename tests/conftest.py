"""Shared fixtures: tiny real pipelines, built once and cached on disk between sessions.

The cache key is a hash of the builder's source, so a change to the tiny architectures rebuilds
them. Set INVOKEAI_TI_TEST_CACHE to move the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import invokeai_ti_plugin.tiny_models as tiny_models
from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import TrainingConfig
from invokeai_ti_plugin.tiny_models import build_tiny_pipeline, make_demo_images
from invokeai_ti_plugin.training.embedding_file import EMBEDDING_KEY, read_embedding_vectors
from invokeai_ti_plugin.training.images import load_training_images
from invokeai_ti_plugin.training.latent_cache import LatentCache
from invokeai_ti_plugin.training.model_files import (
    ModelParts,
    ModelSource,
    inspect_model,
    load_model_parts,
    load_vae,
)
from invokeai_ti_plugin.training.new_tokens import (
    PlaceholderEmbedding,
    add_placeholder_tokens,
    install_placeholder_embedding,
)
from invokeai_ti_plugin.training.objective import denoising_loss
from invokeai_ti_plugin.training.prompts import training_prompts
from invokeai_ti_plugin.training.text_conditioning import TextConditioning, sdxl_time_ids


def _cache_dir() -> Path:
    source = Path(tiny_models.__file__).read_bytes()
    key = hashlib.sha256(source).hexdigest()[:12]
    default = Path.home() / ".cache" / "invokeai-ti-plugin" / "test-models"
    return Path(os.environ.get("INVOKEAI_TI_TEST_CACHE", default)) / key


@pytest.fixture(scope="session")
def sd1_model() -> Path:
    return build_tiny_pipeline(_cache_dir() / "sd-1", "sd-1")


@pytest.fixture(scope="session")
def sd2_model() -> Path:
    return build_tiny_pipeline(_cache_dir() / "sd-2", "sd-2")


@pytest.fixture(scope="session")
def sdxl_model() -> Path:
    return build_tiny_pipeline(_cache_dir() / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def sd1_fp16_files_only(sd1_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1 pipeline as hub downloads and InvokeAI's installer often keep a model:
    only its fp16 variant files (`unet/diffusion_pytorch_model.fp16.safetensors`)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(sd1_model), dtype=torch.float16)
    folder = tmp_path_factory.mktemp("fp16-files-only") / "sd-1"
    pipeline.save_pretrained(str(folder), variant="fp16")
    return folder


@pytest.fixture(scope="session")
def object_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("object-images")
    make_demo_images(folder, count=4)
    return folder


@pytest.fixture
def make_config(sd1_model: Path, object_images: Path, tmp_path: Path):
    """A small, fast, seeded training config; keyword arguments override its fields."""

    def build(**overrides: object) -> TrainingConfig:
        options: dict[str, object] = {
            "model": str(sd1_model),
            "placeholder_token": "<striped-ball>",
            "initializer_token": "ball",
            "train_data_dir": object_images,
            "output_dir": tmp_path / "out",
            "root": tmp_path / "root",
            "max_train_steps": 4,
            "train_batch_size": 2,
            "learning_rate": 1e-2,
            "scale_lr": False,
            "mixed_precision": "no",
            "enable_xformers_memory_efficient_attention": False,
            "seed": 1234,
            "num_validation_images": 0,
        }
        options.update(overrides)
        return TrainingConfig(**options)  # type: ignore[arg-type]

    return build


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Path:
    """A small image file of the given PIL mode."""
    color: object = {"RGB": (200, 30, 30), "RGBA": (0, 90, 200, 128), "L": 128}.get(mode, 1)
    Image.new(mode, size, color).save(path)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="session")
def host_root_template(
    tmp_path_factory: pytest.TempPathFactory, sd1_model: Path, sd2_model: Path, sdxl_model: Path
) -> Path:
    """An InvokeAI root made by the host's own migrations, with the tiny models installed."""
    from invokeai_ti_plugin.host.installed_models import install_main_model
    from invokeai_ti_plugin.host.model_db import open_host_models

    root = tmp_path_factory.mktemp("host-root-template")
    with open_host_models(root) as models:
        install_main_model(models, sd1_model.resolve(), "tiny-sd-1")
        install_main_model(models, sd2_model.resolve(), "tiny-sd-2")
        install_main_model(models, sdxl_model.resolve(), "tiny-sdxl")
        # a model whose files were deleted after it was installed: listed, not trainable
        moved = root / "moved-away"
        shutil.copytree(sd1_model, moved)
        install_main_model(models, moved, "moved-away")
        shutil.rmtree(moved)
    return root


@pytest.fixture
def host_root(host_root_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template root for one test."""
    root = tmp_path / "invokeai"
    shutil.copytree(host_root_template, root)
    return root


def host_records(root: Path, model_type: str = "embedding") -> list:  # type: ignore[type-arg]
    """The host's model records of one type, read through its own record service."""
    from invokeai.backend.model_manager.taxonomy import ModelType

    from invokeai_ti_plugin.host.model_db import open_host_models

    with open_host_models(root) as models:
        return list(models.store.search_by_attr(model_type=ModelType(model_type)))


def fixed_eval_loss(config: TrainingConfig, vectors: dict[str, torch.Tensor]) -> float:
    """Mean loss over every image and prompt with fixed noise and timesteps."""
    info = inspect_model(Path(config.model))
    parts = load_model_parts(info)
    for tokenizer, encoder, start in zip(
        parts.tokenizers, parts.text_encoders, vectors.values(), strict=True
    ):
        ids = add_placeholder_tokens(tokenizer, config.placeholder_token, len(start))
        install_placeholder_embedding(encoder, ids, start)
    images = load_training_images(config.data_dir, info.native_resolution, False)
    cache = LatentCache(load_vae(info), [i.pixels for i in images], False)
    prompts = training_prompts(config.placeholder_token, config.learnable_property)
    conditioning = TextConditioning(parts.tokenizers, parts.text_encoders, prompts, "cpu")
    time_ids = sdxl_time_ids(images, info.native_resolution)
    generator = torch.Generator().manual_seed(99)
    losses = []
    with torch.no_grad():
        for repeat in range(6):
            index = torch.arange(len(images))
            latents = cache.sample(index, torch.zeros_like(index, dtype=torch.bool), generator)
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (len(images),), generator=generator)
            hidden, added = conditioning.encode((index + repeat) % len(prompts), time_ids)
            losses.append(
                denoising_loss(
                    parts.unet, parts.noise_scheduler, latents, hidden, noise, timesteps, added
                )
            )
    return float(torch.stack(losses).mean())


class RecordingSource:
    """A model source that keeps the parts it hands to the trainer, so a test can inspect the
    model a run trained with; everything else is the wrapped source's."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.parts: ModelParts | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def load_parts(self, dtype: torch.dtype) -> ModelParts:
        self.parts = self.source.load_parts(dtype)
        return self.parts


def assert_only_the_new_vectors_changed(original: ModelParts, trained: ModelParts) -> None:
    """Every weight of the trained model is bit-identical to the original's: the UNet, and each
    text encoder with its placeholder lookup put back to the frozen table it wraps (which
    leaves out only the new word's vectors)."""
    for encoder in trained.text_encoders:
        lookup = encoder.get_input_embeddings()
        assert isinstance(lookup, PlaceholderEmbedding)
        encoder.set_input_embeddings(lookup.frozen)
    before_models = [original.unet, *original.text_encoders]
    after_models = [trained.unet, *trained.text_encoders]
    for before_model, after_model in zip(before_models, after_models, strict=True):
        before, after = before_model.state_dict(), after_model.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(value, after[key].cpu()), f"{key} changed"


def generate(pipeline: object, prompt: str) -> np.ndarray:
    """A 64-px picture of `prompt` in two steps, from the same noise every time."""
    images = pipeline(  # type: ignore[operator]
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    return np.asarray(images[0])


COMMAND = str(Path(sys.executable).parent / "invokeai-ti")
# torch.compile's CPU kernels need a C++ compiler: CI installs one (.ci/run) and must run what
# compiles; a local run without one leaves that out
CAN_COMPILE = bool(os.environ.get("CI")) or shutil.which("g++") is not None


def cli_args(model: Path | str, data: Path, out: Path | None, *extra: str) -> list[str]:
    """`invokeai-ti` options for a tiny, quick run teaching <striped-ball>; `out` None leaves
    the output folder to its default."""
    return [
        f"--model={model}",
        "--placeholder_token=<striped-ball>",
        "--initializer_token=ball",
        f"--train_data_dir={data}",
        *([f"--output_dir={out}"] if out is not None else []),
        "--max_train_steps=2",
        "--train_batch_size=2",
        "--mixed_precision=no",
        "--no-enable_xformers_memory_efficient_attention",
        "--num_validation_images=0",
        *extra,
    ]


def host_cli_args(root: Path, data: Path, model: str, *extra: str) -> list[str]:
    """`cli_args` for a model installed in the InvokeAI at `root`, output to its default folder."""
    return cli_args(model, data, None, f"--root={root}", *extra)


# the manual's message for an embedding meeting a model of another base
DIMENSION_MISMATCH = (
    "Cannot load embedding for <{name}>. It was trained on a model with token dimension {got}, "
    "but the current model has token dimension {want}"
)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A safetensors file holding `tensors`, as other tools write embeddings."""
    save_file(tensors, str(path))
    return path


def embedding_vectors(path: Path) -> torch.Tensor:
    """The [n, d] vectors of an SD 1/2 embedding file, read as import and registration read it."""
    return read_embedding_vectors(path).tensors[EMBEDDING_KEY]


def start_training(args: list[str], out: Path) -> subprocess.Popen[str]:
    """`invokeai-ti ARGS` in a subprocess, returned once it has made two updates (so it holds
    its output folder and has something to save)."""
    process = subprocess.Popen(
        [COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    history = out / "logs" / "history.jsonl"
    deadline = time.monotonic() + 180
    while not (history.is_file() and history.read_text().count("\n") >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    return process


def one_error_line(stderr: str, expected: str) -> str:
    """A failed command's stderr holds no traceback and one error line, the last, of the form
    `invokeai-ti: error: ...` and holding `expected`; returns that line."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert errors[0].startswith("invokeai-ti: error: "), errors[0]
    assert expected in errors[0], errors[0]
    return errors[0]


def fails_cleanly(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str, out: Path
) -> None:
    """`invokeai-ti ARGS` stops with status 2 and one error line, having written nothing."""
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not out.exists() or not any(out.iterdir()), "a failed start wrote files"


class Server:
    """A running `invokeai-web`, spoken to over its REST API."""

    def __init__(self, address: str, log_path: Path, token: str | None = None) -> None:
        self.address = address
        self.log_path = log_path
        self.token = token

    @property
    def auth(self) -> dict[str, str]:
        """The headers that say who calls (a multiuser server's logged-in user), if anyone."""
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def login(self, email: str, password: str) -> Server:
        """The same server, called as that user (multiuser mode)."""
        body = {"email": email, "password": password}
        token = self.call("POST", "/api/v1/auth/login", body)["token"]
        return Server(self.address, self.log_path, token)

    def call(self, method: str, route: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.address + route,
            data=data,
            method=method,
            headers={"content-type": "application/json", **self.auth},
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

    def enqueue(self, nodes: dict[str, dict[str, Any]], links: list[tuple[str, ...]]) -> int:
        """Queue a graph of `nodes` (by id) and `links` (source, field, destination, field)."""
        for node_id, node in nodes.items():
            node["id"] = node_id
        edges = [
            {"source": {"node_id": a, "field": b}, "destination": {"node_id": c, "field": d}}
            for a, b, c, d in links
        ]
        graph = {"id": str(uuid.uuid4()), "nodes": nodes, "edges": edges}
        batch = {"batch": {"graph": graph, "runs": 1}, "prepend": False}
        (item_id,) = self.call("POST", "/api/v1/queue/default/enqueue_batch", batch)["item_ids"]
        return int(item_id)

    def wait(self, item_id: int, timeout: float = 180) -> dict[str, Any]:
        """The queue item once it has completed, failed or been canceled."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.call("GET", f"/api/v1/queue/default/i/{item_id}")
            if item["status"] in ("completed", "failed", "canceled"):
                return item
            assert time.monotonic() < deadline, f"queue item {item_id} did not finish"
            time.sleep(0.3)

    def generate(self, model: dict[str, Any], prompt: str) -> np.ndarray:
        """A 64x64 text-to-image run through the queue, nodes cached as the web UI has them."""
        nodes: dict[str, dict[str, Any]] = {
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
        item = self.wait(self.enqueue(nodes, links))
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


@contextmanager
def running_server(
    root: Path, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """`invokeai-web` on `root` at 127.0.0.1, logging to `log_path`; stopped by its process id."""
    port = _free_port()
    monkeypatch.setenv("INVOKEAI_HOST", "127.0.0.1")
    monkeypatch.setenv("INVOKEAI_PORT", str(port))
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    # one OpenMP thread: on a busy 2-core machine, torch's spinning thread team made training
    # in the server 10-20x slower (60 tiny steps: 159 s, against 11 s with one thread)
    env.setdefault("OMP_NUM_THREADS", "1")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "invokeai-web"), "--root", str(root)],
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
        yield Server(running.group(1), log_path)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
