"""Types of kvmlite.migration._wire: the cffi module kvmlite/migration/_wire_build.py
compiles at install time: the destination's receive fast path and the page
tags (AES-128-GCM GMAC through libcrypto).  tests/unit/test_typing.py checks
that this stub names exactly what the compiled module has.
"""

from _cffi_backend import FFI, _CDataBase

ffi: FFI

_Ptr = _CDataBase            # a pointer: ffi.from_buffer(...), ffi.cast(...), a gmac context
_In = _CDataBase | bytes     # a const uint8_t * the caller may pass as bytes


class _Lib:
    def kvmlite_gmac_new(self, key: _In, /) -> _Ptr: ...
    def kvmlite_gmac_free(self, gmac: _Ptr, /) -> None: ...
    def kvmlite_gmac_tags(self, gmac: _Ptr, seq0: int, n: int, heads: _In, head: int, ram: _Ptr,
                          offsets: _Ptr, npages: _Ptr, page: int, tags: _Ptr, /) -> int: ...
    def kvmlite_gmac_check(self, gmac: _Ptr, seq: int, head: _In, head_len: int, payload: _In,
                           npages: int, page: int, tags: _In, bad: _Ptr, /) -> int: ...
    def kvmlite_scatter_pages(self, buf: _In, len: int, rec_type: int, head: int, gpa_off: int,
                              npages_off: int, page: int, tag_len: int, gmac: _Ptr, seq0: int,
                              ram: _Ptr, ram_gpa: int, ram_size: int, max_run: int, written: _Ptr,
                              unverified: _Ptr, heads: _Ptr, heads_cap: int, counts: _Ptr, /) -> int: ...


lib: _Lib
