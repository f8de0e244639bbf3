"""Derive the CLIP BPE tokenizer files shipped in ``invokeai_ti_plugin/data/clip_tokenizer``.

Why this exists: the tiny test/demo pipelines need a *real* CLIP tokenizer (so
token ids match the ones real Stable Diffusion checkpoints use) but nothing may
be downloaded from a model hub at run time. The BPE merge list is published in
the ``open_clip_torch`` wheel as ``bpe_simple_vocab_16e6.txt.gz``; this script
turns it, once, into the ``vocab.json``/``merges.txt`` pair that
``transformers.CLIPTokenizer`` reads. The output is committed, so the script
only needs re-running if the files are ever lost.

Usage::

    python scripts/derive_clip_vocab.py [path/to/open_clip_torch-*.whl] [out_dir]
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_WHEEL = Path("/tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "invokeai_ti_plugin" / "data" / "clip_tokenizer"
# CLIP keeps 49152 - 256 (bytes) - 2 (special tokens) merges; line 0 is a header.
N_MERGES = 49152 - 256 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table (CLIP uses the same)."""
    # Printable Latin-1: "!".."~", inverted-exclamation..not-sign, registered-sign..y-diaeresis.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def read_merges(wheel: Path) -> list[tuple[str, str]]:
    """Read the merge pairs (lines 1..N_MERGES) out of the wheel's gz file."""
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read(MEMBER)).decode("utf-8")
    lines = text.split("\n")[1 : N_MERGES + 1]
    pairs: list[tuple[str, str]] = []
    for line in lines:
        left, right = line.split()
        pairs.append((left, right))
    return pairs


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Bytes, bytes + ``</w>``, one token per merge, then the two special tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(p) for p in merges), BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"expected {VOCAB_SIZE} unique tokens, got {len(vocab)}")
    return vocab


def write_tokenizer(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write the files ``CLIPTokenizer.from_pretrained(out)`` needs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    """Entry point: ``[wheel] [out_dir]``, both optional."""
    wheel = Path(argv[0]) if argv else DEFAULT_WHEEL
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    merges = read_merges(wheel)
    vocab = build_vocab(merges)
    write_tokenizer(out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
