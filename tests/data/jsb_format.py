"""Writers of JSB-format pickles for tests (Python 2 era layout and a modern one)."""

from __future__ import annotations

import pickle
import struct

import numpy as np


def _short_binstring(raw: bytes) -> bytes:
    return b"U" + bytes([len(raw)]) + raw


def py2_jsb_pickle(splits: dict[str, list[list[tuple[int, ...]]]]) -> bytes:
    """Protocol-2 bytes laid out as the reference JSB file: numpy int64 scalars rebuilt by
    ``numpy.core.multiarray.scalar(dtype('i8'), <8 raw bytes as a Python 2 str>)``."""
    out = bytearray(b"\x80\x02}(")
    for name, seqs in splits.items():
        out += _short_binstring(name.encode()) + b"]("
        for seq in seqs:
            out += b"]("
            for chord in seq:
                out += b"("
                for p in chord:
                    out += b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n"
                    out += _short_binstring(b"i8") + b"K\x00K\x01\x87R"
                    out += b"(K\x03" + _short_binstring(b"<")
                    out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
                    out += _short_binstring(struct.pack("<q", p)) + b"\x86R"
                out += b"t"
            out += b"e"
        out += b"e"
    out += b"u."
    return bytes(out)


def py3_jsb_pickle(splits: dict[str, list[list[tuple[int, ...]]]]) -> bytes:
    """The same content pickled by this Python and numpy (numpy int64 scalars)."""
    data = {
        name: [[tuple(np.int64(p) for p in chord) for chord in seq] for seq in seqs]
        for name, seqs in splits.items()
    }
    return pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
