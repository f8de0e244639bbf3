"""`invokeai-ti`: the command line, with the InvokeAI 2.3 manual's flags.

The options are generated from `TrainingConfig`'s fields (names, types, choices, help), so the
command line cannot drift from the one source of truth. Bad input ends in a single line naming
the problem and what to do, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import TrainingConfig, build_config
from .console import guarded, setup_logging, train_on_console
from .host.app_config import find_root

PROG = "invokeai-ti"


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` -> `int`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _help_of(field: FieldInfo) -> str:
    text = field.description or ""
    default = field.default
    if default is not PydanticUndefined and default is not None and not isinstance(default, bool):
        text += f" (default: {default})"
    return text.replace("%", "%%")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per `TrainingConfig` field, same name; unset options keep the model's default."""
    for name, field in TrainingConfig.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        flag = f"--{name}"
        common: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": _help_of(field),
        }
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(annotation)), **common)
        elif annotation in (int, float):
            parser.add_argument(
                flag, type=annotation, metavar=annotation.__name__.upper(), **common
            )
        elif annotation is Path:
            parser.add_argument(flag, type=Path, metavar="PATH", **common)
        else:
            parser.add_argument(flag, metavar="TEXT", **common)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a textual-inversion embedding: teach a Stable Diffusion model a new "
        "word from 3-20 pictures. Other commands: `invokeai-ti demo` (a tiny built-in run), "
        "`invokeai-ti import FILE` (bring in an embedding made elsewhere), "
        "`invokeai-ti export NAME --to DIR` (write it as DIR/NAME.safetensors for A1111 and "
        "ComfyUI), "
        "`invokeai-ti install-nodes` (the start-up node pack).",
    )
    add_config_options(parser)
    parser.add_argument(
        "--list-models",
        "--list_models",
        dest="list_models",
        action="store_true",
        help="List the models installed in InvokeAI (at --root) that can be trained, and exit.",
    )
    parser.add_argument(
        "--gui",
        action="store_true",
        help="Fill in the options in a keyboard form in the terminal instead.",
    )
    return parser


def list_models(root: Path) -> int:
    """Print the main models of InvokeAI at `root`, trainable ones first."""
    from .host.installed_models import installed_models_at

    found = installed_models_at(root)
    if not found:
        print(f"No main models are installed in InvokeAI at {root}.")
        return 0
    width = max(len(model.name) for model in found)
    print(f"Main models installed in InvokeAI at {root}:")
    for model in found:
        status = str(model.path) if model.trainable else f"not trainable: {model.problem}"
        print(f"  {model.name:<{width}}  {model.kind:<13}  {model.key}  {status}")
    return 0


def import_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} import",
        description="Bring in embeddings made elsewhere: .safetensors / .pt / .bin / .ckpt files "
        "of InvokeAI, A1111, ComfyUI, kohya, invoke-training and diffusers (its SDXL pair "
        "learned_embeds + learned_embeds_2 as one embedding), concepts-library folders, A1111 "
        ".png embedding images, and the embeddings bundled in a LoRA. Each is checked, stored "
        "under ROOT/embeddings/<name>/<base>/ in a layout InvokeAI reads correctly, and "
        "registered. Nothing in the files is executed.",
    )
    parser.add_argument(
        "sources", type=Path, nargs="+", metavar="source", help="embedding files or folders"
    )
    parser.add_argument("--name", help="the prompt name (<name>); default: the file's token")
    parser.add_argument(
        "--model",
        help="check the embedding fits this model (name, key, folder); an installed one is "
        "also noted as the embedding's related model in InvokeAI",
    )
    parser.add_argument("--root", type=Path, help="the InvokeAI root (default: InvokeAI's rule)")
    args = parser.parse_args(argv)
    setup_logging()

    def run() -> int:
        from .host.importing import import_embeddings
        from .job import import_target

        root = args.root or find_root()
        model_dim, model_key = import_target(args.model, root) if args.model else (None, None)
        report = import_embeddings(root, args.sources, args.name, model_dim, model_key)
        for what in report.skipped:
            print(f"skipped {what}")
        for registered, origin in report.registered:
            print(
                f"InvokeAI: {registered.verb} <{registered.name}> ({registered.base}) from {origin}"
            )
        return 0

    return guarded(f"{PROG} import", run)


def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write an embedding registered with InvokeAI as DIR/NAME.safetensors, the "
        "file A1111 and ComfyUI know it by (emb_params for SD 1.x/2.x, clip_l + clip_g for "
        "SDXL; diffusers' load_textual_inversion reads it too).",
    )
    parser.add_argument("name", help="the embedding's name, as in <name>")
    parser.add_argument("--base", help="sd-1, sd-2 or sdxl, where NAME exists for several")
    parser.add_argument(
        "--to",
        dest="folder",
        type=Path,
        required=True,
        metavar="DIR",
        help="the folder to write NAME.safetensors into (A1111's embeddings/, ComfyUI's "
        "models/embeddings/)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DIR/NAME.safetensors")
    parser.add_argument("--root", type=Path, help="the InvokeAI root (default: InvokeAI's rule)")
    args = parser.parse_args(argv)

    def run() -> int:
        from .host.exporting import export_embedding

        root = args.root or find_root()
        exported = export_embedding(root, args.name, args.base, args.folder, args.overwrite)
        print(f"Exported <{exported.name}> ({exported.base}) to {exported.path}")
        return 0

    return guarded(f"{PROG} export", run)


def install_nodes_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} install-nodes",
        description="Install the node pack that runs plugins inside InvokeAI at start-up "
        "(registers embeddings dropped into ROOT/embeddings/). Training installs it too.",
    )
    parser.add_argument("--root", type=Path, help="the InvokeAI root (default: InvokeAI's rule)")
    args = parser.parse_args(argv)
    from .host.node_pack import install_node_pack, node_pack_folder

    root = args.root or find_root()
    written = install_node_pack(root, again=True)
    print(f"{'Installed' if written else 'Already installed'}: {node_pack_folder(root)}")
    return 0


def train_main(argv: Sequence[str]) -> int:
    options = vars(build_parser().parse_args(argv))

    def run() -> int:
        if options.pop("list_models"):
            setup_logging()
            return list_models(options.get("root") or find_root())
        if options.pop("gui"):
            from .tui import run_form

            return run_form(options.pop("root", None) or find_root(), options)
        # bad options are reported before the libraries load
        config = build_config({**options, "root": options.get("root") or find_root()})
        setup_logging()
        return train_on_console(config)

    return guarded(PROG, run)


def main(argv: Sequence[str] | None = None) -> int:
    """Every command. Heavy libraries load inside, so a Ctrl-C even while they load ends in one
    line ("aborted", status 130), never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    return guarded(PROG, lambda: _command(args))


def _command(args: list[str]) -> int:
    if args[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(args[1:])
    commands = {"import": import_main, "export": export_main, "install-nodes": install_nodes_main}
    if args[:1] and args[0] in commands:
        return commands[args[0]](args[1:])
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
