"""cffi build script for kvmlite.migration._wire: the stream's C fast paths.

Two things Python cannot do per record at the speed pages move:
* the receive fast path: copy many small PAGES records from the receive
  buffer into guest RAM in one call (the record layout is passed in from
  wire.py, nothing about the format is fixed here);
* page integrity tags: AES-128-GMAC (AES-GCM with additional data only) of
  each PAGES record, through OpenSSL's libcrypto (its AES-NI and
  carry-less-multiply code).  docs/wire-format.md, "Integrity".

Built at install time by setuptools (setup.py lists it);
``python -m kvmlite.migration._wire_build`` builds it in place.
"""

from cffi import FFI

CDEF = r"""
void *kvmlite_gmac_new(const uint8_t *key);
void kvmlite_gmac_free(void *gmac);
int kvmlite_gmac_tags(void *gmac, uint64_t seq0, size_t n, const uint8_t *heads, size_t head,
                      const uint8_t *ram, const int64_t *offsets, const int64_t *npages,
                      size_t page, uint8_t *tags);
int64_t kvmlite_gmac_check(void *gmac, uint64_t seq, const uint8_t *head, size_t head_len,
                           const uint8_t *payload, size_t npages, size_t page, const uint8_t *tags,
                           uint8_t *bad);
size_t kvmlite_scatter_pages(const uint8_t *buf, size_t len, uint8_t rec_type, size_t head,
                             size_t gpa_off, size_t npages_off, size_t page, size_t tag_len,
                             void *gmac, uint64_t seq0,
                             uint8_t *ram, uint64_t ram_gpa, uint64_t ram_size, uint32_t max_run,
                             uint8_t *written, uint8_t *unverified,
                             uint8_t *heads, size_t heads_cap, uint64_t *counts);
"""

# The page tags' C code, shared with kvmlite._postcopy (whose page server and
# receive thread tag and check post-copy records the same way): one place for
# the IV layout.  _postcopy_build.py reads GMAC_SOURCE from this file.
GMAC_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#define TAG_LEN 16
#define IV_LEN 12

/* One GMAC context per stream and direction: AES-128-GCM keyed once, a fresh
   IV per record (the record's sequence number), nothing encrypted. */
static void *kvmlite_gmac_new(const uint8_t *key)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (EVP_EncryptInit_ex(ctx, EVP_aes_128_gcm(), NULL, key, NULL) != 1
        || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, IV_LEN, NULL) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static void kvmlite_gmac_free(void *gmac)
{
    EVP_CIPHER_CTX_free(gmac);
}

/* The tag of page `index` of record `seq`: GMAC over the record's head, then
   the page.  The IV is the record's sequence number (u64) and the page's
   index in it (u32), little-endian: a record or a page moved, repeated or
   dropped no longer matches.  One tag per page, so that a page the guest
   wrote while it was being sent fails alone (docs/wire-format.md). */
static int gmac_tag(EVP_CIPHER_CTX *ctx, uint64_t seq, uint32_t index, const uint8_t *head,
                    size_t head_len, const uint8_t *payload, size_t len, uint8_t *tag)
{
    uint8_t iv[IV_LEN];
    int outl;
    memcpy(iv, &seq, sizeof seq);              /* x86 is little-endian, as the wire */
    memcpy(iv + sizeof seq, &index, sizeof index);
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1
        || EVP_EncryptUpdate(ctx, NULL, &outl, head, (int)head_len) != 1
        || (len && EVP_EncryptUpdate(ctx, NULL, &outl, payload, (int)len) != 1)
        || EVP_EncryptFinal_ex(ctx, NULL, &outl) != 1
        || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, tag) != 1)
        return -1;
    return 0;
}

/* Sender: the page tags of n records numbered seq0.., heads contiguous (head
   bytes each), record i's npages[i] pages at ram + offsets[i]; tags in order. */
static int kvmlite_gmac_tags(void *gmac, uint64_t seq0, size_t n, const uint8_t *heads, size_t head,
                             const uint8_t *ram, const int64_t *offsets, const int64_t *npages,
                             size_t page, uint8_t *tags)
{
    for (size_t i = 0; i < n; i++)
        for (int64_t j = 0; j < npages[i]; j++) {
            if (gmac_tag(gmac, seq0 + i, (uint32_t)j, heads + i * head, head,
                         ram + offsets[i] + j * page, page, tags) != 0)
                return -1;
            tags += TAG_LEN;
        }
    return 0;
}

/* Receiver: record seq's npages pages against their tags; bad[j] = 1 where
   page j's tag does not match, 0 where it does.  Returns how many did not
   match, or -1 if libcrypto failed. */
static int64_t kvmlite_gmac_check(void *gmac, uint64_t seq, const uint8_t *head, size_t head_len,
                                  const uint8_t *payload, size_t npages, size_t page,
                                  const uint8_t *tags, uint8_t *bad)
{
    uint8_t mine[TAG_LEN];
    int64_t nbad = 0;
    for (size_t j = 0; j < npages; j++) {
        if (gmac_tag(gmac, seq, (uint32_t)j, head, head_len, payload + j * page, page, mine) != 0)
            return -1;
        bad[j] = CRYPTO_memcmp(mine, tags + j * TAG_LEN, TAG_LEN) != 0;
        nbad += bad[j];
    }
    return nbad;
}
"""

SOURCE = GMAC_SOURCE + r"""
/* The decoder's fast path (kvmlite/migration/wire.py): copy the consecutive,
   complete PAGES records at the start of buf into RAM: a head (type, gpa u64
   at gpa_off, npages u32 at npages_off, little-endian), npages pages, and
   with integrity on (gmac not NULL) npages tag_len-byte tags, one per page.  It stops before the
   first record that is not PAGES, not complete in buf, or fails any check;
   Python then reads that record itself and says what is wrong with it.  So
   this never judges a stream, it only copies what is plainly right.  A tag
   that does not match is not a verdict either: its page is marked in
   `unverified` (a matching one clears the mark), and the stream is judged
   at END.  The heads go to `heads` for the stream's checksum; counts gets
   records, pages, head bytes and tags that did not match.  Returns the bytes
   consumed. */
static size_t kvmlite_scatter_pages(const uint8_t *buf, size_t len, uint8_t rec_type, size_t head,
                                    size_t gpa_off, size_t npages_off, size_t page, size_t tag_len,
                                    void *gmac, uint64_t seq0,
                                    uint8_t *ram, uint64_t ram_gpa, uint64_t ram_size, uint32_t max_run,
                                    uint8_t *written, uint8_t *unverified,
                                    uint8_t *heads, size_t heads_cap, uint64_t *counts)
{
    size_t pos = 0, nheads = 0;
    uint64_t records = 0, pages = 0, bad = 0;
    if (gmac == NULL)
        tag_len = 0;
    while (len - pos >= head && heads_cap - nheads >= head) {
        const uint8_t *h = buf + pos;
        uint64_t gpa, off;
        uint32_t n;
        if (h[0] != rec_type)
            break;
        memcpy(&gpa, h + gpa_off, 8);
        memcpy(&n, h + npages_off, 4);
        if (n < 1 || n > max_run || (gpa & (page - 1)) || gpa < ram_gpa)
            break;
        off = gpa - ram_gpa;
        if (off > ram_size || (uint64_t)n * page > ram_size - off)
            break;
        if (len - pos - head < (size_t)n * (page + tag_len))
            break;                              /* payload or tags not all here yet */
        if (gmac != NULL) {
            int64_t nbad = kvmlite_gmac_check(gmac, seq0 + records, h, head, h + head, n, page,
                                              h + head + (size_t)n * page, unverified + off / page);
            if (nbad < 0)
                break;                          /* Python reports libcrypto's failure */
            bad += (uint64_t)nbad;
        }
        memcpy(ram + off, h + head, (size_t)n * page);
        memset(written + off / page, 1, n);
        memcpy(heads + nheads, h, head);
        nheads += head;
        pos += head + (size_t)n * (page + tag_len);
        records++;
        pages += n;
    }
    counts[0] = records;
    counts[1] = pages;
    counts[2] = nheads;
    counts[3] = bad;
    return pos;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmlite.migration._wire", SOURCE, libraries=["crypto"],
                      extra_compile_args=["-O2"])

if __name__ == "__main__":
    import os
    os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    ffibuilder.compile(verbose=False)
