"""kvmlite.control.arraycodec: how x-query-pagemap's per-page arrays travel as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvmlite.control.arraycodec import decode_array, encode_array, mask_to_words, words_to_mask
from kvmlite.errors import KvmliteError


def test_arrays_round_trip_through_json():
    """encode_array / decode_array survive JSON, for words and bytes."""
    words = np.array([0, 1 << 63, 12345], dtype="<u8")
    rounds = np.arange(300, dtype=np.uint16).astype(np.uint8)
    for a in (words, rounds):
        back = decode_array(json.loads(json.dumps(encode_array(a))))
        assert back.dtype == a.dtype and np.array_equal(back, a)


def test_bad_arrays_are_one_line_errors():
    """A wrong dtype, a short payload or garbage is a KvmliteError naming the array."""
    good = encode_array(np.arange(10, dtype=np.uint8))
    for bad in ({**good, "dtype": "<f8"}, {**good, "shape": [11]}, {**good, "zlib_base64": "!!"},
                {"dtype": "|u1"}, "nope"):
        with pytest.raises(KvmliteError, match="bad sent_round"):
            decode_array(bad, "sent_round")


def test_bitmap_words_put_page_p_in_bit_p_mod_64_of_word_p_div_64():
    """mask_to_words follows the dirty log's layout, and words_to_mask undoes it."""
    mask = np.zeros(130, dtype=bool)
    mask[[0, 65, 129]] = True
    words = mask_to_words(mask)
    assert words.tolist() == [1, 2, 2]
    assert np.array_equal(words_to_mask(words, 130), mask)


def test_a_bitmap_too_short_for_its_pages_is_refused():
    """Fewer bits than pages is a malformed reply, not a short mask."""
    with pytest.raises(KvmliteError, match="a bitmap of 64 bits for 65 pages"):
        words_to_mask(np.zeros(1, dtype="<u8"), 65)


def test_only_words_and_bytes_are_encoded():
    """The codec sends the two dtypes the monitor uses and refuses others before they travel."""
    with pytest.raises(ValueError, match="<f8"):
        encode_array(np.zeros(3))
