"""The QMP stream splitter: values come out whole however the bytes are cut,
and hostile input costs one error, never a traceback or a runaway."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlite.control.jsonstream import MAX_DEPTH, MAX_SIZE, JsonError, JsonStream

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed(*chunks: bytes, stream: JsonStream | None = None) -> list:
    s = stream or JsonStream()
    out = []
    for c in chunks:
        out += s.feed(c)
    return [("error", o.desc) if isinstance(o, JsonError) else o for o in out]


def chunked(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


# JSON values as QMP carries them: strings with escapes, quotes, brackets and
# non-ASCII in them; finite numbers; nesting well inside the limit.
scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
containers = st.lists(values, max_size=4) | st.dictionaries(st.text(max_size=8), values, max_size=4)


@FAST
@given(st.lists(containers, min_size=1, max_size=5), st.data())
def test_values_survive_any_cut(objs, data):
    """Back to back, with or without whitespace between, cut anywhere: the
    same values come out, in order."""
    seps = [data.draw(st.sampled_from(["", " ", "\r\n", "\n\t "])) for _ in objs]
    text = "".join(json.dumps(o, ensure_ascii=data.draw(st.booleans())) + sep
                   for o, sep in zip(objs, seps)).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert feed(*pieces) == objs


def test_every_split_point_of_escapes_and_utf8():
    obj = {"execute": "x\\\"}{\u00e9\u2028\U0001f600", "arguments": {"a": ["]", "\\", "\""]}}
    raw = json.dumps(obj, ensure_ascii=False).encode() + json.dumps(obj).encode()
    for k in range(len(raw) + 1):
        assert feed(raw[:k], raw[k:]) == [obj, obj], k


@FAST
@given(st.binary(max_size=400), st.integers(1, 50))
def test_arbitrary_bytes_only_give_values_or_errors(data, step):
    stream = JsonStream(max_size=256, max_depth=8)
    out = []
    for i in range(0, len(data), step):
        out += stream.feed(data[i:i + step])
    assert all(isinstance(o, (dict, list, JsonError)) for o in out)
    # and the stream is still usable after the reset the spec prescribes
    assert feed(b"\x01{\"ok\": 1}", stream=stream)[-1] == {"ok": 1}


def test_top_level_junk_is_one_error_per_run():
    out = feed(b'hello world 42 "str{" true} ] {"execute": "a"} null null {"execute": "b"}')
    assert out == [("error", "QMP input must be a JSON object (got 'hello world 42')"),
                   {"execute": "a"},
                   ("error", "QMP input must be a JSON object (got 'null null')"),
                   {"execute": "b"}]
    assert feed(b"}")[0] == ("error", "JSON parse error, stray '}'")
    assert feed(b"a " * 500_000) == [("error", "QMP input must be a JSON object (got 'a a a a a a a a a a a a ...')")]


def test_arrays_are_values():
    assert feed(b"[1, 2][]") == [[1, 2], []]


def test_too_deep_is_one_error_and_the_rest_is_skipped():
    deep = b"[" * 100_000 + b"]" * 100_000
    assert feed(*chunked(deep, 4096), b'{"next": 1}') == [
        ("error", f"JSON nesting depth limit exceeded (at most {MAX_DEPTH} levels)"), {"next": 1}]
    ok = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert feed(ok) == [json.loads(ok)]


def test_too_large_is_one_error_and_its_tail_is_never_a_value():
    # Past the limit the value holds things that look like requests, inside
    # its string and as nested objects: none of them may come out.
    in_string = b'\\"}\n{\\"execute\\": \\"quit\\"}\n' * 10
    nested = b', "more": [' + b'{"execute": "quit"}, ' * 10 + b"1]"
    big = b'{"execute": "x", "arguments": {"s": "' + b"a" * (10 << 20) + in_string + b'"' + nested + b"}}"
    out = feed(*chunked(big), b'{"execute": "after"}')
    assert out == [("error", f"JSON size limit exceeded (at most {MAX_SIZE} bytes)"), {"execute": "after"}]
    big_array = b'{"a": [' + b"[]," * 3_000_000 + b"1]}"
    assert feed(*chunked(big_array), b"{}") == [("error", f"JSON size limit exceeded (at most {MAX_SIZE} bytes)"), {}]


def test_unterminated_value_never_grows_past_the_limit():
    stream = JsonStream(max_size=1000)
    out = []
    for _ in range(100):
        out += stream.feed(b'{"a": "' + b"x" * 500)
    assert [o.desc for o in out] == ["JSON size limit exceeded (at most 1000 bytes)"]
    assert len(stream._buf) == 0


@pytest.mark.parametrize("text, desc", [
    (b'{"a": NaN}', "JSON parse error, NaN is not a JSON number"),
    (b'{"a": Infinity}', "JSON parse error, Infinity is not a JSON number"),
    (b'{"a": -Infinity}', "JSON parse error, -Infinity is not a JSON number"),
    (b'{"a": 1e999}', "JSON parse error, number 1e999 is out of range"),
    (b'{"a": ' + b"9" * 5000 + b"}", "JSON parse error, integer 999999999999999999999999... is out of range"),
    (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key 'a'"),
    (b'{"execute": }', "JSON parse error, expecting value"),
    (b"{'single': 1}", "JSON parse error, expecting property name enclosed in double quotes"),
    (b'{"a": "\xff', "JSON parse error, stray byte 0xff"),
    (b'{"a": "\xc3\x28"}', "JSON parse error, invalid UTF-8"),
    (b'{"a": [}]', "JSON parse error, expecting value"),
])
def test_refused_values(text, desc):
    assert feed(text, b'{"next": 1}') == [("error", desc), {"next": 1}]


def test_control_byte_resets_a_half_sent_value():
    """QMP spec, "Forcing the JSON parser into known-good state"."""
    assert feed(b'{"execute": "stop", "argu', b"\x01", b'{"execute": "cont"}') == [
        ("error", "JSON parse error, stray byte 0x01"), {"execute": "cont"}]
    # inside a string too, and after a split escape
    assert feed(b'{"a": "x\\', b"\x1b", b"{}") == [("error", "JSON parse error, stray byte 0x1b"), {}]
    # a run of them is one error
    assert feed(b"\x01" * 100_000, b"{}") == [("error", "JSON parse error, stray byte 0x01"), {}]


def test_end_of_input_in_the_middle_of_a_value():
    s = JsonStream()
    assert s.feed(b'{"execute": "st') == []
    assert [e.desc for e in s.eof()] == ["JSON parse error, premature end of input"]
    assert s.feed(b"{}") == [{}]


def test_random_mutations_of_a_real_request_never_raise():
    base = (b'{"execute": "migrate-set-parameters", '
            b'"arguments": {"downtime-limit": 300, "x-auth-key": "k\\"ey"}, "id": [1, {"a": null}]}')
    rng = random.Random(15)
    for _ in range(2000):
        b = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out = feed(bytes(b), b'{"sync": 1}')
        assert all(isinstance(o, (dict, list, tuple)) for o in out)
