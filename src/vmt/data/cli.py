"""``vmt data ...`` commands: build memory-mapped corpora from text files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["add_data_commands", "load_tokenizer"]


def load_tokenizer(name: str) -> Any:
    """A tokenizer by name: ``"char"`` (printable ASCII :class:`~vmt.data.corpus.CharTokenizer`),
    ``"smollm2-135m-instruct"`` (the default LM's), a local Hugging Face folder or a ``.gguf``
    file."""
    if name == "char":
        from vmt.data.corpus import CharTokenizer

        return CharTokenizer()
    from transformers import AutoTokenizer

    from vmt.encoders.pretrained import resolve_lm_path

    folder, gguf_file = resolve_lm_path(name)
    if gguf_file is None and not Path(folder).is_dir() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"no tokenizer folder at {name} (give 'char', a folder, a .gguf file or a hub id)")
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load tokenizer {name!r}: {first}") from err


def _build(args: argparse.Namespace) -> int:
    from vmt.data.memmap import build_memmap_corpus

    tokenizer = load_tokenizer(args.tokenizer)
    corpus = build_memmap_corpus(
        args.text, tokenizer, args.out, split=args.split, min_tokens=args.min_tokens,
        progress=not args.quiet,
    )
    sys.stdout.write(
        f"{corpus.directory}: {len(corpus)} documents, {corpus.num_tokens} tokens "
        f"({corpus.tokens.dtype}), fingerprint {corpus.fingerprint[:16]}\n"
    )
    return 0


def add_data_commands(subparsers) -> None:
    """Add ``vmt data build`` to the ``vmt`` command line."""
    data = subparsers.add_parser("data", help="prepare corpora", description="Prepare corpora.")
    sub = data.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser(
        "build",
        help="tokenise text files into a memory-mapped corpus",
        description="Tokenise text files into a memory-mapped corpus folder (tokens.bin, "
        "offsets.npy, header.json), streaming the input. An interrupted build continues where "
        "it stopped when run again with the same arguments.",
    )
    build.add_argument("--text", nargs="+", required=True, metavar="FILE", help="input text files")
    build.add_argument("--tokenizer", default="smollm2-135m-instruct",
                       help="'char', 'smollm2-135m-instruct', a local tokenizer folder or .gguf")
    build.add_argument("--out", required=True, metavar="DIR", help="corpus folder")
    build.add_argument("--split", choices=["blank", "line", "file"], default="blank",
                       help="documents are separated by blank lines (default), are lines, or files")
    build.add_argument("--min-tokens", type=int, default=2, help="drop shorter documents")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)
