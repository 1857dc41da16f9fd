"""Data: tokenised text corpora and polyphonic music (piano rolls)."""

from vmt.data.corpus import (
    CharTokenizer,
    TokenizedCorpus,
    default_corpus,
    pydoc_texts,
    pydoc_topics,
    read_text_files,
    tokenize,
)
from vmt.data.music import load_jsb_chorales, music21_chorales, pitches_to_roll, roll_to_pitches

__all__ = [
    "CharTokenizer",
    "TokenizedCorpus",
    "default_corpus",
    "load_jsb_chorales",
    "music21_chorales",
    "pitches_to_roll",
    "pydoc_texts",
    "pydoc_topics",
    "read_text_files",
    "roll_to_pitches",
    "tokenize",
]
