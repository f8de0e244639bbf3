"""Tiny SD 1.x, 2.x and SDXL models as one `.safetensors` file in the original (LDM) key layout.

Real single-file checkpoints cannot be downloaded in tests, so this writes the tiny diffusers
pipelines of `tiny_models` the way such files store them (`model.diffusion_model.*`,
`first_stage_model.*`, and `cond_stage_model.transformer.*` for SD 1.x, OpenCLIP-layout
`cond_stage_model.model.*` for SD 2.x, or SDXL's `conditioner.embedders.0.transformer.*` and
OpenCLIP-layout `conditioner.embedders.1.model.*`).
Loading one needs the diffusers configs of the model family, which `from_single_file` takes from
the Hugging Face hub cache; `prepare_hub_configs` puts the tiny pipeline's configs there, under
the repo id diffusers asks for, so loading works offline exactly as on a real install. Kept
apart from `tiny_models`, whose source is the test cache's key: a change here rebuilds nothing
else.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .training.bases import CROSS_ATTENTION_DIMS

__all__ = [
    "build_single_file_source",
    "hub_repo_for",
    "prepare_hub_configs",
    "write_tiny_single_file",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."
# diffusers tells an SDXL base checkpoint by a key of its second encoder's tenth block
SDXL_TEXT_2_LAYERS = 10
# diffusers and InvokeAI tell SD 1 from SD 2 by `input_blocks.2.1`, the first down block's
# second attention: a UNet with one layer per block has none
SD2_LAYERS_PER_BLOCK = 2

# diffusers resnet part -> LDM ResBlock part, in the UNet and in the VAE
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size and pooled-text conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _unet_key(key: str, config: dict[str, Any]) -> str:
    """One diffusers UNet key in LDM's numbering: input/middle/output blocks of sequential
    layers, each down block `layers_per_block` (resnet, attention) pairs and a downsampler,
    each up block one pair more and an upsampler."""
    per_block = int(config["layers_per_block"]) + 1
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    patterns: list[tuple[str, Any]] = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
            lambda b, i, part: f"input_blocks.{1 + b * per_block + i}.0.{_UNET_RESNET[part]}",
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)",
            lambda b, i: f"input_blocks.{1 + b * per_block + i}.1",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv",
            lambda b: f"input_blocks.{b * per_block + per_block}.0.op",
        ),
        (
            r"mid_block\.resnets\.(\d+)\.(\w+)",
            lambda i, part: f"middle_block.{2 * i}.{_UNET_RESNET[part]}",
        ),
        (r"mid_block\.attentions\.0", lambda: "middle_block.1"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
            lambda b, i, part: f"output_blocks.{b * per_block + i}.0.{_UNET_RESNET[part]}",
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)",
            lambda b, i: f"output_blocks.{b * per_block + i}.1",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
            lambda b: (
                f"output_blocks.{b * per_block + per_block - 1}."
                f"{2 if up_has_attention[b] else 1}.conv"
            ),
        ),
    ]
    return _rename(key, patterns)


def _vae_key(key: str, config: dict[str, Any]) -> str:
    """One diffusers VAE key in LDM's names; LDM numbers the decoder's up blocks from the
    lowest resolution up, diffusers in the order they run."""
    last_up = len(config["up_block_types"]) - 1

    def resnet(part: str) -> str:
        return "nin_shortcut" if part == "conv_shortcut" else part

    patterns: list[tuple[str, Any]] = [
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
            lambda b, i, part: f"encoder.down.{b}.block.{i}.{resnet(part)}",
        ),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", lambda b: f"encoder.down.{b}.downsample"),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
            lambda b, i, part: f"decoder.up.{last_up - b}.block.{i}.{resnet(part)}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
            lambda b: f"decoder.up.{last_up - b}.upsample",
        ),
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)",
            lambda side, i, part: f"{side}.mid.block_{int(i) + 1}.{resnet(part)}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)",
            lambda side, part: f"{side}.mid.attn_1.{_VAE_ATTENTION[part]}",
        ),
        (r"(encoder|decoder)\.conv_norm_out", lambda side: f"{side}.norm_out"),
    ]
    return _rename(key, patterns)


def _rename(key: str, patterns: list[tuple[str, Any]]) -> str:
    """The key with its first matching prefix rewritten (numbers passed as ints); others as is."""
    for pattern, new in patterns:
        match = re.match(pattern, key)
        if match:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            return new(*groups) + key[match.end() :]
    return key


def _open_clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights as OpenCLIP names them, the way SD 2 checkpoints store their
    encoder and SDXL checkpoints their second: q, k and v packed into one projection per block,
    and (SDXL's) text projection as the matrix the pooled output is multiplied by (transposed)."""
    layout = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        layout["text_projection"] = state["text_projection.weight"].T
    block_key = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
    blocks = {int(m[1]) for key in state if (m := block_key.match(key))}
    parts = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for block in sorted(blocks):
        old, new = f"text_model.encoder.layers.{block}.", f"transformer.resblocks.{block}."
        for kind in ("weight", "bias"):
            layout[f"{new}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{old}self_attn.{name}_proj.{kind}"] for name in "qkv"]
            )
            for ours, theirs in parts.items():
                layout[f"{new}{ours}.{kind}"] = state[f"{old}{theirs}.{kind}"]
    return layout


def single_file_state_dict(pipeline_folder: Path) -> dict[str, torch.Tensor]:
    """A tiny SD 1.x, 2.x or SDXL pipeline's weights under the keys of an original checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = str(pipeline_folder)
    sdxl = (pipeline_folder / "text_encoder_2").is_dir()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        state[UNET_PREFIX + _unet_key(key, dict(unet.config))] = tensor
    for key, tensor in vae.state_dict().items():
        ldm = _vae_key(key, dict(vae.config))
        if ".mid.attn_1." in ldm and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        state[VAE_PREFIX + ldm] = tensor
    if unet.config.cross_attention_dim == CROSS_ATTENTION_DIMS["sd-2"]:
        for key, tensor in _open_clip_layout(text_encoder.state_dict()).items():
            state[SD2_TEXT_PREFIX + key] = tensor
    else:
        for key, tensor in text_encoder.state_dict().items():
            state[(SDXL_TEXT_PREFIX if sdxl else TEXT_PREFIX) + key] = tensor
    if sdxl:
        encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
        for key, tensor in _open_clip_layout(encoder_2.state_dict()).items():
            state[SDXL_TEXT_2_PREFIX + key] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}


def build_single_file_source(tiny_pipeline: Path, path: Path) -> Path:
    """The tiny SD 2 or SDXL pipeline with what diffusers needs to recognise its family in a
    checkpoint, in the precision such files are shared in; written (once) as a diffusers folder
    at `path`, to become a single file. SD 2: a UNet `SD2_LAYERS_PER_BLOCK` layers per block,
    float32. SDXL: a second text encoder `SDXL_TEXT_2_LAYERS` deep, float16."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(5)
    if (tiny_pipeline / "text_encoder_2").is_dir():
        config = CLIPTextConfig.from_pretrained(str(tiny_pipeline), subfolder="text_encoder_2")
        config.num_hidden_layers = SDXL_TEXT_2_LAYERS
        encoder_2 = CLIPTextModelWithProjection(config).to(torch.float16)
        pipeline = DiffusionPipeline.from_pretrained(
            str(tiny_pipeline), text_encoder_2=encoder_2, dtype=torch.float16
        )
    else:
        unet_config = UNet2DConditionModel.load_config(str(tiny_pipeline), subfolder="unet")
        unet = UNet2DConditionModel.from_config(
            {**unet_config, "layers_per_block": SD2_LAYERS_PER_BLOCK}
        )
        pipeline = DiffusionPipeline.from_pretrained(str(tiny_pipeline), unet=unet)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        pipeline.save_pretrained(str(temp))
        temp.rename(path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return path


def write_tiny_single_file(pipeline_folder: Path, path: Path) -> Path:
    """Write (once; an existing file is kept) a tiny pipeline as one checkpoint file."""
    from safetensors.torch import save_file

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        save_file(single_file_state_dict(pipeline_folder), str(temp))
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def hub_repo_for(checkpoint: Path) -> str:
    """The hub repo whose configs diffusers' `from_single_file` reads for this checkpoint,
    found by diffusers' own rule (the host passes no config of its own)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors.torch import load_file

    repo: str = fetch_diffusers_config(load_file(str(checkpoint)))["pretrained_model_name_or_path"]
    return repo


def prepare_hub_configs(hub_cache: Path, repo_id: str, pipeline_folder: Path) -> Path:
    """A Hugging Face hub cache holding `repo_id`'s configs (the tiny pipeline's JSON and
    tokenizer files, no weights), as a first online `from_single_file` would leave it."""
    revision = "0" * 40
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for source in pipeline_folder.rglob("*"):
        if source.is_file() and source.suffix in (".json", ".txt"):
            target = snapshot / source.relative_to(pipeline_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
