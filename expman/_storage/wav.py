"""WAV files as expman stores audio: 16-bit PCM or 32-bit IEEE float, written by the
collector and read back by `Run.read_media` (the standard library's `wave` reads no float)."""

from __future__ import annotations

import struct
from typing import Any

from expman._errors import ExpmanError

_PCM, _FLOAT = 1, 3


def encode(data: bytes, dtype: str, channels: int, sample_rate: int) -> bytes:
    """`data`: interleaved little-endian samples of `dtype` ("int16" or "float32")."""
    fmt, bits = (_PCM, 16) if dtype == "int16" else (_FLOAT, 32)
    block = channels * bits // 8
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, sample_rate, sample_rate * block, block, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk
    if fmt == _FLOAT:  # non-PCM WAV carries the frame count in a fact chunk
        chunks += b"fact" + struct.pack("<II", 4, len(data) // block)
    chunks += b"data" + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def decode(blob: bytes) -> tuple[Any, int]:
    """(samples as numpy, shape (n, channels), sample rate) of a PCM16 or float32 WAV."""
    import numpy as np

    if blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise ExpmanError("not a WAV file")
    pos, fmt = 12, None
    while pos + 8 <= len(blob):
        tag, size = blob[pos:pos + 4], struct.unpack_from("<I", blob, pos + 4)[0]
        body = blob[pos + 8:pos + 8 + size]
        if tag == b"fmt ":
            fmt = struct.unpack_from("<HHIIHH", body)
        elif tag == b"data":
            if fmt is None:
                raise ExpmanError("WAV data before its fmt chunk")
            kind, channels, rate, _, _, bits = fmt
            dtype = {(_PCM, 16): "<i2", (_FLOAT, 32): "<f4"}.get((kind, bits))
            if dtype is None:
                raise ExpmanError(f"WAV format {kind} with {bits} bits is not one expman writes")
            return np.frombuffer(body, dtype=dtype).reshape(-1, channels), rate
        pos += 8 + size + (size % 2)
    raise ExpmanError("WAV file without a data chunk")
