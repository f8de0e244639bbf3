"""The `invokeai-ti` command: the manual's options, and bad input that costs nothing."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from invokeai_ti_plugin.cli import main
from invokeai_ti_plugin.training.checkpoints import list_checkpoints
from invokeai_ti_plugin.training.embedding_file import read_embedding_vectors

from .conftest import COMMAND, cli_args, fails_cleanly, start_training, write_image

MANUAL_OPTIONS = [
    "--model",
    "--resolution",
    "--learnable_property",
    "--initializer_token",
    "--placeholder_token",
    "--train_data_dir",
    "--output_dir",
    "--scale_lr",
    "--no-scale_lr",
    "--train_batch_size",
    "--gradient_accumulation_steps",
    "--max_train_steps",
    "--learning_rate",
    "--resume_from_checkpoint",
    "--lr_scheduler",
    "--lr_warmup_steps",
    "--mixed_precision",
    "--only_save_embeds",
    "--center_crop",
    "--enable_xformers_memory_efficient_attention",
    "--seed",
    "--checkpointing_steps",
    "--gui",
]


def test_help_lists_every_option_of_the_manual() -> None:
    shown = subprocess.run([COMMAND, "--help"], capture_output=True, text=True, check=True).stdout
    for option in MANUAL_OPTIONS:
        assert option in shown, option
    assert "constant_with_warmup" in shown and "{no,fp16,bf16}" in shown
    assert "(default: 3000)" in shown
    # the learning rate's default follows --optimizer (argparse wraps the help's lines)
    assert "Default: 5e-4 with adamw, 1.0 with prodigy" in " ".join(shown.split())


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_missing_data_dir(capsys, sd1_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = cli_args(sd1_model, tmp_path / "missing", out)
    fails_cleanly(capsys, args, "--train_data_dir: folder", out)


def test_data_dir_without_images(capsys, sd1_model: Path, empty_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fails_cleanly(capsys, cli_args(sd1_model, empty_dir, out), "holds no PNG, JPEG or WebP", out)


def test_data_dir_with_images_only_in_sub_folders_names_one(
    capsys, sd1_model: Path, tmp_path: Path
) -> None:
    data = tmp_path / "kohya"
    for sub in ("10_ball", "5_other"):
        (data / sub).mkdir(parents=True)
        write_image(data / sub / "a.png")
    (data / ".hidden").mkdir()
    write_image(data / ".hidden" / "b.png")
    out = tmp_path / "out"
    fails_cleanly(
        capsys,
        cli_args(sd1_model, data, out),
        f"holds no PNG, JPEG or WebP images of its own, only in sub-folders, which are not "
        f"searched; pass the one to train on, e.g. --train_data_dir {data / '10_ball'}",
        out,
    )


def test_data_dir_with_only_unreadable_images(capsys, sd1_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    fails_cleanly(capsys, cli_args(sd1_model, data, out), "none of the image files", out)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--placeholder_token=cat"], "'cat' is already a word of the model's vocabulary"),
        (["--initializer_token=<|endoftext|>"], "gives no ordinary tokens for this model"),
        (["--resolution=500"], "--resolution: must be a positive multiple of 8"),
        (["--max_train_steps=0"], "--max_train_steps: must be a positive whole number"),
        (["--train_batch_size=0"], "--train_batch_size: must be a positive whole number"),
        (["--learning_rate=0"], "--learning_rate: must be a positive number"),
        (["--resume_from_checkpoint=/nowhere"], "is not a checkpoint folder"),
    ],
)
def test_bad_option(
    capsys, sd1_model: Path, object_images: Path, tmp_path: Path, extra: list[str], expected: str
) -> None:
    out = tmp_path / "out"
    fails_cleanly(capsys, cli_args(sd1_model, object_images, out, *extra), expected, out)


def test_model_that_is_not_a_pipeline(
    capsys, empty_dir: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = cli_args(empty_dir, object_images, out)
    fails_cleanly(capsys, args, "is not a Stable Diffusion diffusers pipeline folder", out)


def test_unwritable_output_dir(
    capsys, sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    out = blocker / "out"
    fails_cleanly(capsys, cli_args(sd1_model, object_images, out), "cannot write to", out)


def test_an_earlier_embedding_is_not_overwritten(
    capsys, sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(cli_args(sd1_model, object_images, out)) == 0
    embedding = out / "learned_embeds.safetensors"
    before = embedding.read_bytes()
    capsys.readouterr()
    assert main(cli_args(sd1_model, object_images, out, "--seed=7")) == 2
    assert "already holds an embedding" in capsys.readouterr().err
    assert embedding.read_bytes() == before
    assert main(cli_args(sd1_model, object_images, out, "--seed=7", "--overwrite")) == 0
    assert embedding.read_bytes() != before


def test_unreadable_images_among_good_ones_are_skipped(
    capsys, sd1_model: Path, tmp_path: Path
) -> None:
    data = tmp_path / "mixed"
    data.mkdir()
    for index in range(3):
        write_image(data / f"good{index}.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    assert main(cli_args(sd1_model, data, out)) == 0
    assert "skipping broken.jpg" in capsys.readouterr().err
    assert (out / "learned_embeds.safetensors").is_file()


@pytest.mark.parametrize("stored", ["float32", "fp16 files only"])
def test_full_pipeline_export_keeps_the_models_precision(
    stored: str,
    sd1_model: Path,
    sd1_fp16_files_only: Path,
    object_images: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The exported pipeline holds the learned vector, in the precision of the model's files,
    under the plain names that loaders find without being told a variant."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    model, dtype = (sd1_model, "F32") if stored == "float32" else (sd1_fp16_files_only, "F16")
    out = tmp_path / "out"
    assert main(cli_args(model, object_images, out, "--no-only_save_embeds")) == 0
    assert "multivariate normal" not in caplog.text  # transformers' notice on resizing a table
    exported = out / "pipeline"
    for component, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        (weights,) = (exported / component).glob("*.safetensors")
        assert weights.name == f"{name}.safetensors"
        with safe_open(str(weights), framework="pt") as tensors:
            assert {tensors.get_slice(key).get_dtype() for key in tensors.keys()} == {dtype}  # noqa: SIM118
    pipeline = StableDiffusionPipeline.from_pretrained(str(exported))
    (token_id,) = pipeline.tokenizer("<striped-ball>", add_special_tokens=False).input_ids
    (learned,) = read_embedding_vectors(out / "learned_embeds.safetensors").tensors.values()
    row = pipeline.text_encoder.get_input_embeddings().weight[token_id]
    as_stored = {"F32": torch.float32, "F16": torch.float16}[dtype]
    assert torch.equal(row, learned[0].to(as_stored).float())


@pytest.mark.parametrize(
    ("files", "variant"),
    [
        (["model.safetensors", "model.fp16.safetensors"], None),  # a whole hub snapshot
        (["model.bf16.safetensors"], "bf16"),
        (["model.bf16.safetensors", "model.fp16.safetensors"], "fp16"),
        (  # sharded: the index names the variant after "index"
            [
                "diffusion_pytorch_model.safetensors.index.fp16.json",
                "diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
                "diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
            ],
            "fp16",
        ),
        (["config.json", "notes.fp16.txt"], None),
    ],
)
def test_the_variant_to_load_follows_the_weight_files(
    files: list[str], variant: str | None, tmp_path: Path
) -> None:
    from invokeai_ti_plugin.training.weight_files import weights_variant

    for name in files:
        (tmp_path / name).touch()
    assert weights_variant(tmp_path) == variant


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_embedding(
    sd1_model: Path, object_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = cli_args(sd1_model, object_images, out, "--max_train_steps=100000", "--seed=3")
    process = start_training(args, out)
    history = out / "logs" / "history.jsonl"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Stopped at step" in stdout and "--resume_from_checkpoint latest" in stdout
    steps_done = len(history.read_text().splitlines())
    assert [p.name for p in list_checkpoints(out)][-1] == f"checkpoint-{steps_done}"
    assert (out / "learned_embeds.safetensors").is_file()
    assert not list(out.rglob("*.partial"))

    resumed = cli_args(sd1_model, object_images, out, f"--max_train_steps={steps_done + 2}")
    assert main([*resumed, "--resume_from_checkpoint=latest"]) == 0
    assert len(history.read_text().splitlines()) == steps_done + 2


def test_images_of_a_real_photo_size_train(
    capsys: pytest.CaptureFixture[str], sd1_model: Path, tmp_path: Path
) -> None:
    """Photos of camera sizes, wider than tall, are all read, cropped and scaled to --resolution,
    and train a finite SD 1 embedding of one vector."""
    data = tmp_path / "photos"
    data.mkdir()
    for index in range(3):
        Image.new("RGB", (300 + index * 10, 200), (index * 60, 80, 160)).save(data / f"{index}.jpg")
    out = tmp_path / "out"
    assert main(cli_args(sd1_model, data, out, "--center_crop", "--resolution=64")) == 0
    assert "skipping" not in capsys.readouterr().err  # every photo was readable
    assert "3 images at 64 px" in (out / "logs" / "train.log").read_text()
    summary = json.loads((out / "embedding.json").read_text())
    assert (summary["resolution"], summary["steps"], summary["base"]) == (64, 2, "sd-1")
    lines = (out / "logs" / "history.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    assert len(history) == 2 and all(math.isfinite(entry["loss"]) for entry in history)
    stored = read_embedding_vectors(out / "learned_embeds.safetensors")  # checks it is finite
    assert stored.base("trained") == "sd-1" and stored.tensors["emb_params"].shape == (1, 768)
