"""Reader for the IDX files that MNIST and FashionMNIST ship in (raw or gzip-compressed).

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian
uint32 sizes, then the data in row-major order. Only unsigned bytes (dtype 0x08) occur in
these data sets, so only that type is read; anything else, a truncated body or trailing
bytes is reported as a corrupted file rather than reshaped into garbage.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_UBYTE = 0x08


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array stored in the IDX file ``path``, which must have ``ndim`` dimensions.

    Files whose name ends in ``.gz`` are decompressed on the fly. Raises ValueError when the
    magic number, the number of dimensions or the body size disagree with the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise ValueError(f"{path}: cannot be read as an IDX file ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, dtype_code, file_ndim = raw[:4]
    if zero0 or zero1 or dtype_code != _UBYTE or file_ndim != ndim:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected "
            f"0x0000{_UBYTE:02x}{ndim:02x} (unsigned bytes, {ndim} dimension(s))"
        )
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: header announces {ndim} sizes but the file ends before them")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    body = len(raw) - header_end
    if body != expected:
        raise ValueError(
            f"{path}: size mismatch, header shape {shape} needs {expected} data bytes "
            f"but the file holds {body}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)
