"""Issue 9, item 10: what used to end in a traceback ends in one line, and loses nothing.

Bad numbers, a caption that is not UTF-8, an image too large to load, a full disk, Ctrl-C while
starting up, and the form without a terminal: each test asserts the exit status, the one line
on stderr (never a traceback) and what is left on disk.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.autoencoders.vae import Decoder
from PIL import Image
from torch.nn.modules.module import register_module_forward_hook

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.config import MAX_RESOLUTION, MIN_RESOLUTION, SEED_MAX
from invokeai_ti_plugin.training.checkpoints import list_checkpoints
from invokeai_ti_plugin.training.embedding_file import EMBEDDING_FILENAME
from invokeai_ti_plugin.training.images import load_training_images
from invokeai_ti_plugin.training.run_folder import LOCK_FILENAME, MARKER_FILENAME, RunFolder
from invokeai_ti_plugin.training.run_setup import RunLogFile

from .conftest import COMMAND, cli_args, fails_cleanly, one_error_line, write_image


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("--adam_beta1=2", "--adam_beta1: must be at least 0 and below 1"),
        ("--adam_beta2=1", "--adam_beta2: must be at least 0 and below 1"),
        ("--adam_beta2=nan", "--adam_beta2: Input should be a finite number"),
        ("--adam_epsilon=-1", "--adam_epsilon: must be a small positive number"),
        ("--adam_epsilon=0", "--adam_epsilon: must be a small positive number"),
        ("--adam_weight_decay=nan", "--adam_weight_decay: Input should be a finite number"),
        ("--adam_weight_decay=-0.1", "--adam_weight_decay: must be zero or more"),
        ("--seed=99999999999999999999999", f"--seed: must be a whole number from 0 to {SEED_MAX}"),
        ("--seed=-1", "--seed: must be a whole number from 0"),
        ("--resolution=100000", "--resolution: must be a positive multiple of 8 from 64 to 2048"),
        ("--resolution=8", "--resolution: must be a positive multiple of 8 from 64 to 2048"),
        ("--learning_rate=inf", "--learning_rate: Input should be a finite number"),
        ("--learning_rate=nan", "--learning_rate: Input should be a finite number"),
        (  # the optimizer failed with a traceback past float32's range
            "--learning_rate=1e39",
            "--learning_rate: must be a positive number such as 5e-4, at most 1e+30 (got 1e+39)",
        ),
        ("--train_batch_size=100000000000000000000", "--train_batch_size: must be at most 256"),
        ("--num_validation_images=1000", "--num_validation_images: must be at most 16"),
    ],
)
def test_absurd_numbers_are_refused_in_one_line(
    capsys, sd1_model: Path, object_images: Path, tmp_path: Path, extra: str, expected: str
) -> None:
    out = tmp_path / "out"
    fails_cleanly(capsys, cli_args(sd1_model, object_images, out, extra), expected, out)


def test_the_edges_of_each_range_are_accepted(make_config) -> None:
    config = make_config(
        adam_beta1=0.0,
        adam_beta2=0.9999,
        adam_weight_decay=0.0,
        adam_epsilon=1e-30,
        seed=SEED_MAX,
        resolution=MAX_RESOLUTION,
        train_batch_size=256,
        num_validation_images=16,
    )
    assert (config.seed, config.resolution, config.adam_beta1) == (SEED_MAX, MAX_RESOLUTION, 0.0)
    assert (make_config(seed=0).seed, make_config(resolution=MIN_RESOLUTION).resolution) == (0, 64)


def _data_with_caption(tmp_path: Path, caption: bytes) -> Path:
    data = tmp_path / "captioned"
    data.mkdir()
    for index in range(3):
        write_image(data / f"{index}.png")
    (data / "0.txt").write_bytes(caption)
    return data


def test_a_caption_that_is_not_utf8_is_named(capsys, sd1_model: Path, tmp_path: Path) -> None:
    data = _data_with_caption(tmp_path, "a red café in winter".encode("cp1252"))
    out = tmp_path / "out"
    args = cli_args(sd1_model, data, out)
    fails_cleanly(capsys, args, f"caption {data / '0.txt'} is not UTF-8 text", out)
    assert main(args) == 2
    assert "save it as UTF-8, or delete it" in capsys.readouterr().err


def test_a_caption_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    data = _data_with_caption(tmp_path, "\ufeffa red  café\n".encode())
    images = load_training_images(data, 32, center_crop=False)
    assert [image.caption for image in images] == ["a red café", None, None]


def _write_huge_png(path: Path, side: int) -> None:
    """A valid black 1-bit PNG of side x side pixels, small on disk, made without holding its
    pixels in memory (Pillow would need side**2 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = bytes(1 + (side + 7) // 8)  # the filter byte, then the row's bits
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.mark.slow
def test_an_image_too_large_to_load_is_skipped(capsys, sd1_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "with-a-giant"
    data.mkdir()
    for index in range(3):
        write_image(data / f"good{index}.png")
    giant = data / "giant.png"
    _write_huge_png(giant, 20000)
    assert 2 * (Image.MAX_IMAGE_PIXELS or 0) < 20000 * 20000  # past Pillow's refusal limit

    out = tmp_path / "out"
    assert main(cli_args(sd1_model, data, out)) == 0
    err = capsys.readouterr().err
    assert "skipping giant.png: too large to load" in err and "Traceback" not in err
    assert (out / EMBEDDING_FILENAME).is_file()
    assert [image.path.name for image in load_training_images(data, 32, False)] == [
        f"good{index}.png" for index in range(3)
    ]


def _limited_to(size: int) -> Callable[[], None]:
    """Files the child writes stop at `size` bytes with EFBIG, as on a full disk (ulimit -f);
    SIGXFSZ, which would kill it instead, is ignored (Python ignores it too)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


@pytest.fixture
def finished_run(sd1_model: Path, object_images: Path, tmp_path: Path) -> Path:
    """A run of 2 steps with a checkpoint at each, its embedding and loss plot written."""
    import matplotlib.font_manager  # noqa: F401 - its cache is built now, not under a limit

    out = tmp_path / "out"
    assert main(cli_args(sd1_model, object_images, out, "--checkpointing_steps=1")) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@contextmanager
def module_forward_hook(hook: Callable[..., None]) -> Iterator[None]:
    """`hook` runs after every module's forward meanwhile: where a test makes torch fail as a
    GPU would."""
    handle = register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "failure",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        # what a 12 GiB card gave for SDXL once torch's cache held the rest (gpu_check, H200)
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
    ids=["torch", "cublas"],
)
def test_a_gpu_out_of_memory_is_one_line_and_the_run_resumes(
    capsys, sd1_model: Path, object_images: Path, tmp_path: Path, failure: RuntimeError
) -> None:
    """No GPU here: the UNet's second training forward raises what CUDA raises (the evaluation's
    forwards run without gradients and are let through)."""
    out = tmp_path / "out"
    training_forwards = 0

    def run_out_at_step_two(module: torch.nn.Module, _args: object, _output: object) -> None:
        nonlocal training_forwards
        if isinstance(module, UNet2DConditionModel) and torch.is_grad_enabled():
            training_forwards += 1
            if training_forwards == 2:
                raise failure

    steps = ("--max_train_steps=3", "--checkpointing_steps=1")
    with module_forward_hook(run_out_at_step_two):
        status = main(cli_args(sd1_model, object_images, out, *steps))
    assert status == 2
    line = one_error_line(capsys.readouterr().err, "error: the GPU ran out of memory at step 2 (")
    assert "gradient checkpointing off): add --gradient_checkpointing, or lower" in line
    assert line.endswith(
        f"continue from the last checkpoint before it, {out / 'checkpoints'}/checkpoint-1"
    )
    assert not (out / EMBEDDING_FILENAME).exists()

    assert (
        main(cli_args(sd1_model, object_images, out, *steps, "--resume_from_checkpoint=latest"))
        == 0
    )
    assert (out / EMBEDDING_FILENAME).is_file()
    assert [folder.name for folder in list_checkpoints(out)][-1] == "checkpoint-3"


def _in_the_decoder(module: torch.nn.Module) -> bool:
    return isinstance(module, Decoder)  # the VAE's decoder: used by sample grids alone


def _in_the_evaluation(module: torch.nn.Module) -> bool:
    # the UNet without gradients: the evaluation loss's (grids are off in these runs)
    return isinstance(module, UNet2DConditionModel) and not torch.is_grad_enabled()


@pytest.mark.parametrize(
    ("fails", "options", "warning", "steps"),
    [
        (
            _in_the_decoder,
            ("--num_validation_images=2", "--validation_steps=1", "--no-eval_loss"),
            "no sample grid at step {}: the GPU ran out of memory drawing 2 images",
            (1, 2),
        ),
        (
            _in_the_evaluation,
            ("--validation_steps=1",),
            "no evaluation loss at step {}: the GPU ran out of memory measuring it",
            (0, 1, 2),
        ),
    ],
    ids=["sample-grid", "evaluation"],
)
def test_out_of_memory_in_a_preview_or_a_measurement_is_skipped_and_training_goes_on(
    capsys,
    sd1_model: Path,
    object_images: Path,
    tmp_path: Path,
    fails: Callable[[torch.nn.Module], bool],
    options: tuple[str, ...],
    warning: str,
    steps: tuple[int, ...],
) -> None:
    """Neither is worth the run: CUDA's out of memory while drawing a grid or measuring the
    evaluation loss costs that grid or measurement, with a warning saying so, not the
    embedding."""
    out = tmp_path / "out"

    def run_out_of_memory(module: torch.nn.Module, *_: object) -> None:
        if fails(module):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    with module_forward_hook(run_out_of_memory):
        status = main(cli_args(sd1_model, object_images, out, *options))
    assert status == 0
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    for step in steps:
        assert warning.format(step) in stderr
    assert (out / EMBEDDING_FILENAME).is_file()
    assert not list(RunFolder(out).samples.glob("*"))
    assert (out / "loss.png").is_file()  # the run's other outputs are all there


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["checkpoint", "loss plot"])
def test_a_full_disk_is_one_line_and_loses_nothing(
    capsys, finished_run: Path, sd1_model: Path, object_images: Path, failing: str
) -> None:
    out = finished_run
    before = _files(out)
    checkpoint_sizes = [len(data) for name, data in before.items() if name.startswith("checkp")]
    small_files = [len(data) for name, data in before.items() if name.startswith((".", "logs"))]
    if failing == "checkpoint":
        limit = 4096  # the run's own small files fit; a checkpoint's random state does not
        assert max(small_files) < limit < max(checkpoint_sizes)
    else:
        limit = max(checkpoint_sizes) + 1  # checkpoints fit, the loss plot does not
        assert len(before["loss.png"]) > limit
    resume = [
        *cli_args(sd1_model, object_images, out, "--checkpointing_steps=1"),
        "--max_train_steps=4",
        "--resume_from_checkpoint=latest",
    ]
    ran = subprocess.run(
        [COMMAND, *resume], capture_output=True, text=True, preexec_fn=_limited_to(limit)
    )
    assert ran.returncode == 2, ran.stderr
    error = one_error_line(ran.stderr, "invokeai-ti: error: the disk is full: could not write ")
    assert "--resume_from_checkpoint latest" in error

    after = _files(out)
    assert not [name for name in after if "partial" in name]
    for name in ("learned_embeds.safetensors", "embedding.json", "loss.png"):
        assert after[name] == before[name], f"{name} changed"
    for step in (1, 2):
        folder = f"checkpoints/checkpoint-{step}/"
        assert {n: d for n, d in after.items() if n.startswith(folder)} == {
            n: d for n, d in before.items() if n.startswith(folder)
        }
    if failing == "checkpoint":
        assert f"{out / 'checkpoints'}/.checkpoint-3.partial/" in error
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    else:
        assert f"could not write {out / 'loss.png'} " in error
        assert [p.name for p in list_checkpoints(out)][-1] == "checkpoint-3"

    capsys.readouterr()
    assert main(resume) == 0  # with room again, the run continues where it stopped
    assert [p.name for p in list_checkpoints(out)][-1] == "checkpoint-4"
    assert len((out / "logs" / "history.jsonl").read_text().splitlines()) == 4


def _stderr_lines(text: str) -> list[str]:
    """stderr without the `-X importtime` lines the interrupted child was asked to print."""
    return [line for line in text.splitlines() if not line.startswith("import time:")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment",
    [
        "torch._C",  # importing torch
        "loading ",  # loading the model (our log line just before it)
        "each encoded once",  # encoding the images, after the output folder was claimed
    ],
)
def test_ctrl_c_while_starting_up_aborts_in_one_line(
    sd1_model: Path, object_images: Path, tmp_path: Path, moment: str
) -> None:
    out = tmp_path / "out"
    child = subprocess.Popen(
        [COMMAND, *cli_args(sd1_model, object_images, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert child.stderr is not None
    seen = []
    for line in child.stderr:  # each import and log line as it happens
        seen.append(line)
        if moment in line:
            child.send_signal(signal.SIGINT)
            break
    else:
        pytest.fail(f"never reached {moment!r}: {''.join(_stderr_lines(''.join(seen)))}")
    stdout, rest = child.communicate(timeout=300)
    lines = _stderr_lines("".join(seen) + rest)
    assert child.returncode == 130, lines
    assert "Traceback" not in "".join(lines)
    said = [line for line in lines if "error" in line.lower() or "abort" in line.lower()]
    assert said == ["invokeai-ti: aborted"] and lines[-1] == said[0], lines
    assert stdout == ""
    written = {p.relative_to(out).as_posix() for p in out.rglob("*")} if out.exists() else set()
    assert written <= {MARKER_FILENAME, LOCK_FILENAME, "logs", "logs/train.log"}, written


@pytest.mark.slow
def test_the_form_without_a_terminal_says_so(host_root: Path) -> None:
    before = set(host_root.rglob("*"))
    ran = subprocess.run(
        [COMMAND, "--gui", f"--root={host_root}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,  # it used to wait for keys forever
    )
    assert ran.returncode == 2, ran.stderr
    error = one_error_line(ran.stderr, "the training form needs an interactive terminal")
    assert "give the options on the command line" in error
    new = [p.relative_to(host_root).parts[0] for p in set(host_root.rglob("*")) - before]
    assert set(new) <= {"databases", "outputs"}, new  # only the host's own, opening its database


def test_the_command_line_starts_before_torch_loads() -> None:
    """What lets Ctrl-C at any moment of start-up end in one line: our `main` is running (and
    catching it) before the heavy libraries load."""
    probe = "import sys, invokeai_ti_plugin.cli; print({'torch', 'diffusers'} & set(sys.modules))"
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "set()"


def test_a_run_log_on_a_full_disk_falls_silent(capsys) -> None:
    """/dev/full refuses every write with ENOSPC, as a full disk does: the log stops without
    printing Python's logging traceback per line, and the run's own writes say it in one line."""
    handler = RunLogFile(Path("/dev/full"))
    logger = logging.getLogger("invokeai_ti_plugin.test_full_disk")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for step in range(3):
            logger.info("step %d", step)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert handler.failed
    assert "Logging error" not in capsys.readouterr().err
