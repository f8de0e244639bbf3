"""--torch_compile: the training step's UNet through torch.compile (inductor, for real, on the
tiny pipeline and the CPU's C++ compiler), and what a machine that cannot compile is told."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.callback import callback_handler

from invokeai_ti_plugin.training.model_files import FolderModelSource
from invokeai_ti_plugin.training.trainer import Trainer

from .conftest import (
    CAN_COMPILE,
    COMMAND,
    RecordingSource,
    cli_args,
    embedding_vectors,
    one_error_line,
)


@pytest.mark.skipif(
    not CAN_COMPILE, reason="no C++ compiler for torch.compile's CPU kernels (apt install g++)"
)
@pytest.mark.slow
def test_compiled_training_learns_what_eager_training_learns(
    make_config, sd1_model: Path, tmp_path: Path
) -> None:
    eager = Trainer(make_config(max_train_steps=3, output_dir=tmp_path / "eager")).run()

    compilations: list[object] = []

    def started(*args: object) -> None:  # torch 2.7 passes nothing, later ones what started
        compilations.append(args)

    callback_handler.register_start_callback(started)
    source = RecordingSource(FolderModelSource(sd1_model))
    try:
        compiled = Trainer(
            make_config(
                max_train_steps=3, output_dir=tmp_path / "compiled", torch_compile="default"
            ),
            model_source=source,
        ).run()
    finally:  # the run's own torch._dynamo.reset() may have removed it already
        if started in callback_handler.start_callbacks:
            callback_handler.remove_start_callback(started)

    assert compilations, "the UNet was never compiled"
    learned = embedding_vectors(compiled.embedding_path)
    expected = embedding_vectors(eager.embedding_path)
    lookup = source.parts.text_encoders[0].get_input_embeddings()
    ball = lookup.frozen.weight[source.parts.tokenizers[0].convert_tokens_to_ids("ball</w>")]
    assert (expected - ball.detach().cpu()).abs().max() > 1e-3  # the runs did learn
    torch.testing.assert_close(learned, expected, rtol=1e-4, atol=1e-6)
    # the source's UNet is the module itself, never the compiled wrapper
    assert type(source.parts.unet) is UNet2DConditionModel

    # with gradient checkpointing too, as the memory plan turns it on for a small GPU, and
    # without dynamo's warning about diffusers' code
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointed = Trainer(
            make_config(
                max_train_steps=3,
                output_dir=tmp_path / "checkpointed",
                torch_compile="default",
                gradient_checkpointing=True,
            )
        ).run()
    assert not [w for w in caught if "Dynamo" in str(w.message)]
    learned = embedding_vectors(checkpointed.embedding_path)
    torch.testing.assert_close(learned, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_machine_that_cannot_compile_gets_one_line_and_can_train_without(
    sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),  # inductor's C++ compiler on a CPU
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing compiled before
    }
    failed = subprocess.run(
        [COMMAND, *cli_args(sd1_model, object_images, out, "--torch_compile=default")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert failed.returncode == 2
    line = one_error_line(failed.stderr, "--torch_compile: torch.compile failed on this machine (")
    assert "C++ compiler" in line and "train without --torch_compile" in line
    assert not (out / "learned_embeds.safetensors").exists()

    again = subprocess.run(
        [COMMAND, *cli_args(sd1_model, object_images, out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert (out / "learned_embeds.safetensors").is_file()
