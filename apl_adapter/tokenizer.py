"""The real CLIP tokenizer, built offline.

Stable Diffusion 1.x/2.x and both SDXL encoders use OpenAI CLIP's byte-level BPE with 49,408
tokens. The ``open_clip_torch`` wheel ships that vocabulary as ``bpe_simple_vocab_16e6.txt.gz``;
installed with ``pip install --no-deps open_clip_torch`` it is a 1.3 MB data file and needs no
network at run time. This module turns it into the ``vocab.json`` + ``merges.txt`` pair that
:class:`transformers.CLIPTokenizer` reads.

Example:

```python
>>> from apl_adapter.tokenizer import load_clip_tokenizer
>>> tok = load_clip_tokenizer()
>>> tok("a photo of a cat").input_ids
[49406, 320, 1125, 539, 320, 2368, 49407]

```
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
# OpenAI's vocabulary: 256 byte symbols, the same 256 with an end-of-word mark, the merges
# (lines 1 .. 48,894 of the BPE file) and the two special tokens.
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def find_bpe_file() -> Path:
    """Locate the BPE vocabulary shipped inside the installed ``open_clip_torch`` wheel.

    Reads the package location with :mod:`importlib` only: ``import open_clip`` itself needs
    torchvision, which this project does not depend on.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The CLIP BPE vocabulary comes from the open_clip_torch wheel, which is not installed. "
            "Fix: pip install --no-deps open_clip_torch ftfy wcwidth"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip_torch install; reinstall the wheel.")
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in CLIP's id order.

    Printable Latin-1 bytes map to themselves and come first; the other bytes map to
    code points from 256 upward and follow, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def read_clip_bpe(bpe_file: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read the BPE file into CLIP's ``(vocab, merges)``: token -> id, and the ordered merge pairs."""
    bpe_file = Path(bpe_file) if bpe_file is not None else find_bpe_file()
    with gzip.open(bpe_file, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_file} gave {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}: not the CLIP BPE file")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(out_dir: str | os.PathLike, bpe_file: str | os.PathLike | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the files ``CLIPTokenizer.from_pretrained`` reads)."""
    vocab, merges = read_clip_bpe(bpe_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return read_clip_bpe()


def load_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Build the real 49,408-token :class:`~transformers.CLIPTokenizer` without any download.

    Args:
        model_max_length: sequence length the tokenizer pads/truncates to (77 for Stable Diffusion).
        pad_token: ``"<|endoftext|>"`` as in SD 1.x and SDXL's first encoder; SD 2.x and SDXL's
            second encoder pad with ``"!"``.
    """
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length, pad_token=pad_token)
