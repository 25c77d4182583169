"""Arrays on the monitor: how `x-query-pagemap` sends per-page numpy arrays as JSON.

Arrays travel as {"dtype", "shape", "zlib_base64"}: the numpy bytes of the
array, zlib-compressed, base64 text.  Bitmaps are uint64 words, page p in
bit p % 64 of word p // 64 (the layout of KVM's dirty log and of the guest's
free bitmap); a 16 GiB guest's bitmap is 512 KiB before compression.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

from .. import bitmap
from ..bitmap import mask_to_words  # noqa: F401  (the codec's callers take both from here)
from ..errors import KvmliteError

ARRAY_DTYPES = ("<u8", "|u1")
MAX_ARRAY_BYTES = 1 << 30


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    if a.dtype.str not in ARRAY_DTYPES:
        raise ValueError(f"cannot encode a {a.dtype.str} array (only {', '.join(ARRAY_DTYPES)})")
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "zlib_base64": base64.b64encode(zlib.compress(a.tobytes(), 1)).decode()}


def decode_array(obj, what: str = "array") -> np.ndarray:
    """The inverse of encode_array; anything malformed raises KvmliteError."""
    try:
        dtype, shape, data = obj["dtype"], obj["shape"], obj["zlib_base64"]
        if dtype not in ARRAY_DTYPES or not isinstance(shape, list) or len(shape) != 1 \
                or type(shape[0]) is not int or shape[0] < 0:
            raise ValueError(f"dtype {dtype!r}, shape {shape!r}")
        nbytes = shape[0] * np.dtype(dtype).itemsize
        if nbytes > MAX_ARRAY_BYTES:
            raise ValueError(f"{nbytes} bytes is more than the {MAX_ARRAY_BYTES >> 20} MiB limit")
        d = zlib.decompressobj()
        raw = d.decompress(base64.b64decode(data, validate=True), nbytes + 1)
        if len(raw) != nbytes or not d.eof:
            raise ValueError(f"{len(raw)} bytes where the shape says {nbytes}")
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise KvmliteError(f"x-query-pagemap: bad {what}: {e}") from None
    return np.frombuffer(raw, dtype=dtype)


def words_to_mask(words: np.ndarray, npages: int) -> np.ndarray:
    """uint64 bitmap words from a monitor reply -> a bool per page (the first `npages`)."""
    if len(words) * 64 < npages:
        raise KvmliteError(f"x-query-pagemap: a bitmap of {len(words) * 64} bits for {npages} pages")
    return bitmap.words_to_mask(words, npages)
