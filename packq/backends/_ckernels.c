/* packq's compiled CPU kernels: the AWQ word transpose, GGUF's blocks and AWQ's dequantization, in one pass each,
 * without the GIL.
 *
 * Built by setuptools when a C compiler is there (an optional extension: without one, packq installs and the
 * NumPy ufunc paths write the same bytes). numba kernels exist too (packq[fast]), but loading numba costs about
 * 0.5 s and 105 MB in every process, as much as a whole 1 GB relayout's floor on 2 cores; this module loads in
 * a millisecond. Plain C99, no NumPy headers: arrays come as contiguous buffers (the buffer protocol) and
 * their shapes as integers, checked here against the buffers' sizes; the Python wrappers in
 * packq/backends/numpy.py check the rest (dtypes, shapes) and choose the threads.
 *
 * Words are little-endian uint32 (the wrappers refuse big-endian hosts). Every kernel is checked bit for bit
 * against the reference encoders by hypothesis properties (tests/test_ckernels.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* AWQ's interleave: slot s of a word holds column AWQ_PACK_ORDER[s] of its 8 (packq.formats.awq) */
static const int AWQ_ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};

/* the transpose's tile: 16 word columns (one 64-byte line of a source row) by 16 groups (one line of an output row) */
#define TILE 16
/* groups per tile of the weight_packed transpose: 64, 256 bytes of each output row per tile (the rows of a K = 4096
 * layer lie 2 KB apart, so each row written costs a TLB and cache-set miss: 64 groups ran 1.1-1.2x 16, medians of 7) */
#ifndef TILE_G
#define TILE_G 64
#endif

/* The word transposes (awq_to_ct, awq_to_gptq, awq_to_gguf) in two builds of one body: plain (the compiler's baseline,
 * SSE2 on x86-64), and where the CPU has AVX-512 (F, BW, VL), compiled for it by a function attribute (TILE's 16
 * lanes of 32 bits are one register): 1.4-1.5x on awq_to_ct, this project's 2-core AMD EPYC, 2026-12-02. Chosen at
 * run time (transposes_level); one build runs on every x86-64 CPU. */
#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define WIDE_TRANSPOSES 1
#define WIDE __attribute__((target("avx512f,avx512bw,avx512vl")))
#include <immintrin.h>
#else
#define WIDE_TRANSPOSES 0
#endif

/* the level the transposes run at: 1 AVX-512, 0 plain; -1 until first asked (then what the CPU has) */
static int transposes_set = -1;
static int transposes_have(void) {
#if WIDE_TRANSPOSES
    static int have = -1;
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    }
    return have;
#else
    return 0;
#endif
}
static int transposes_level(void) {
    int have = transposes_have();
    return transposes_set < 0 || transposes_set > have ? have : transposes_set;
}

/* the delta swap t = ((a >> k) ^ b) & m; a ^= t << k; b ^= t, on TILE lanes (vectorized by the compiler) */
static inline ALWAYS_INLINE void swap_lanes(uint32_t *restrict a, uint32_t *restrict b, int k, uint32_t m) {
    for (int l = 0; l < TILE; l++) {
        uint32_t t = ((a[l] >> k) ^ b[l]) & m;
        a[l] ^= t << k;
        b[l] ^= t;
    }
}

/* nw <= TILE words into a tile row, the rest zero: a whole row by a copy of constant size, which compiles to vector
 * loads (a copy of a run-time size is a call to memcpy: a fifth of a compressed-tensors conversion's CPU, by perf) */
static inline ALWAYS_INLINE void load_lanes(uint32_t *restrict dst, const uint32_t *restrict src, int nw) {
    if (nw == TILE) {
        memcpy(dst, src, 4 * TILE);
        return;
    }
    memcpy(dst, src, 4 * (size_t)nw);
    memset(dst + nw, 0, 4 * (size_t)(TILE - nw));
}

/* v[i][l] for 8 rows i: afterwards nibble i of v[s][l] is what nibble s of v[i][l] was (an 8 x 8 nibble transpose
 * in every lane l) */
static inline ALWAYS_INLINE void transpose_lanes(uint32_t v[8][TILE]) {
    for (int i = 0; i < 4; i++)
        swap_lanes(v[i], v[i + 4], 16, 0x0000FFFFu);
    for (int i = 0; i < 8; i += 4) {
        swap_lanes(v[i], v[i + 2], 8, 0x00FF00FFu);
        swap_lanes(v[i + 1], v[i + 3], 8, 0x00FF00FFu);
    }
    for (int i = 0; i < 8; i += 2)
        swap_lanes(v[i], v[i + 1], 4, 0x0F0F0F0Fu);
}

/* the tile's words to their rows: word l of slot s of group gl goes to row r0 + 8 l + AWQ_ORDER[s], column gt + gl;
 * a (group x word) transpose, by 4 x 4 blocks of SSE2 registers on x86-64, else word by word */
static inline ALWAYS_INLINE void store_tile(uint32_t t[TILE_G][8][TILE], uint32_t *out, Py_ssize_t groups, Py_ssize_t r0, Py_ssize_t gt, int ng,
                       int nw) {
#if defined(__SSE2__)
    if (ng % 4 == 0 && nw == TILE) {
        for (int s = 0; s < 8; s++)
            for (int l = 0; l < TILE; l += 4)
                for (int gl = 0; gl < ng; gl += 4) {
                    __m128i a = _mm_loadu_si128((const __m128i *)&t[gl][s][l]);
                    __m128i b = _mm_loadu_si128((const __m128i *)&t[gl + 1][s][l]);
                    __m128i c = _mm_loadu_si128((const __m128i *)&t[gl + 2][s][l]);
                    __m128i d = _mm_loadu_si128((const __m128i *)&t[gl + 3][s][l]);
                    __m128i ab0 = _mm_unpacklo_epi32(a, b), ab1 = _mm_unpackhi_epi32(a, b);
                    __m128i cd0 = _mm_unpacklo_epi32(c, d), cd1 = _mm_unpackhi_epi32(c, d);
                    uint32_t *o = out + (r0 + 8 * l + AWQ_ORDER[s]) * groups + gt + gl;
                    _mm_storeu_si128((__m128i *)o, _mm_unpacklo_epi64(ab0, cd0));
                    _mm_storeu_si128((__m128i *)(o + 8 * groups), _mm_unpackhi_epi64(ab0, cd0));
                    _mm_storeu_si128((__m128i *)(o + 16 * groups), _mm_unpacklo_epi64(ab1, cd1));
                    _mm_storeu_si128((__m128i *)(o + 24 * groups), _mm_unpackhi_epi64(ab1, cd1));
                }
        return;
    }
#endif
    for (int l = 0; l < nw; l++)
        for (int s = 0; s < 8; s++) {
            uint32_t *o = out + (r0 + 8 * l + AWQ_ORDER[s]) * groups + gt;
            for (int gl = 0; gl < ng; gl++)
                o[gl] = t[gl][s][l];
        }
}

/* AWQ qweight words (K, C) -> compressed-tensors' weight_packed rows of word columns [c0, c1): out (8 (c1 - c0), K/8),
 * row 8 (w - c0) + AWQ_ORDER[s] word g = nibbles s of src[8 g + i][w], i = 0..7; groups [g0, g1) only (a thread's
 * share). Per tile: each group's 8 rows of 16 words transposed in lanes (contiguous loads), then each output row's
 * 16 words stored together. */
static inline ALWAYS_INLINE void awq_to_ct_body(const uint32_t *src, Py_ssize_t k, Py_ssize_t c, Py_ssize_t c0,
                                               Py_ssize_t c1, uint32_t *out, Py_ssize_t g0, Py_ssize_t g1) {
    Py_ssize_t groups = k / 8;
    uint32_t t[TILE_G][8][TILE]; /* [group in tile][slot s][word in tile] */
    for (Py_ssize_t gt = g0; gt < g1; gt += TILE_G) {
        int ng = (int)(gt + TILE_G < g1 ? TILE_G : g1 - gt);
        for (Py_ssize_t wt = c0; wt < c1; wt += TILE) {
            int nw = (int)(wt + TILE < c1 ? TILE : c1 - wt);
            for (int gl = 0; gl < ng; gl++) {
                const uint32_t *rows = src + 8 * (gt + gl) * c + wt;
                for (int i = 0; i < 8; i++)
                    load_lanes(t[gl][i], rows + i * c, nw);
                transpose_lanes(t[gl]);
            }
            store_tile(t, out, groups, 8 * (wt - c0), gt, ng, nw);
        }
    }
}

#define AWQ_TO_CT_ARGS const uint32_t *src, Py_ssize_t k, Py_ssize_t c, Py_ssize_t c0, Py_ssize_t c1, uint32_t *out, \
    Py_ssize_t g0, Py_ssize_t g1
static void awq_to_ct_plain(AWQ_TO_CT_ARGS) { awq_to_ct_body(src, k, c, c0, c1, out, g0, g1); }
#if WIDE_TRANSPOSES
WIDE static void awq_to_ct_wide(AWQ_TO_CT_ARGS) { awq_to_ct_body(src, k, c, c0, c1, out, g0, g1); }
#endif
static void awq_to_ct(AWQ_TO_CT_ARGS) {
#if WIDE_TRANSPOSES
    if (transposes_level()) {
        awq_to_ct_wide(src, k, c, c0, c1, out, g0, g1);
        return;
    }
#endif
    awq_to_ct_plain(src, k, c, c0, c1, out, g0, g1);
}

/* AWQ qweight words (K, C) -> GPTQ's qweight (K/8, 8 C): word (g, 8 w + AWQ_ORDER[s]) = nibbles s of src[8 g + i][w],
 * groups [g0, g1). A group's 8 rows and its output row are the same 8 C words of each layout, so out may be src
 * itself: each group is copied to `tmp` (8 C words) before its row is stored. */
static inline ALWAYS_INLINE void awq_to_gptq_body(const uint32_t *src, Py_ssize_t c, uint32_t *out, Py_ssize_t g0,
                                                 Py_ssize_t g1, uint32_t *tmp) {
    uint32_t v[8][TILE];
    for (Py_ssize_t g = g0; g < g1; g++) {
        memcpy(tmp, src + 8 * g * c, 4 * (size_t)(8 * c));
        uint32_t *o = out + 8 * g * c;
        for (Py_ssize_t wt = 0; wt < c; wt += TILE) {
            int nw = (int)(wt + TILE < c ? TILE : c - wt);
            for (int i = 0; i < 8; i++)
                load_lanes(v[i], tmp + i * c + wt, nw);
            transpose_lanes(v);
            for (int l = 0; l < nw; l++)
                for (int s = 0; s < 8; s++)
                    o[8 * (wt + l) + AWQ_ORDER[s]] = v[s][l];
        }
    }
}

#define AWQ_TO_GPTQ_ARGS const uint32_t *src, Py_ssize_t c, uint32_t *out, Py_ssize_t g0, Py_ssize_t g1, uint32_t *tmp
static void awq_to_gptq_plain(AWQ_TO_GPTQ_ARGS) { awq_to_gptq_body(src, c, out, g0, g1, tmp); }
#if WIDE_TRANSPOSES
WIDE static void awq_to_gptq_wide(AWQ_TO_GPTQ_ARGS) { awq_to_gptq_body(src, c, out, g0, g1, tmp); }
#endif
static void awq_to_gptq(AWQ_TO_GPTQ_ARGS) {
#if WIDE_TRANSPOSES
    if (transposes_level()) {
        awq_to_gptq_wide(src, c, out, g0, g1, tmp);
        return;
    }
#endif
    awq_to_gptq_plain(src, c, out, g0, g1, tmp);
}

/* the nibbles of x at the low halves of a uint64's 8 bytes (nibble i at byte i) */
static inline ALWAYS_INLINE uint64_t spread(uint32_t x) {
    uint64_t y = x;
    y = (y | (y << 16)) & 0x0000FFFF0000FFFFull;
    y = (y | (y << 8)) & 0x00FF00FF00FF00FFull;
    y = (y | (y << 4)) & 0x0F0F0F0F0F0F0F0Full;
    return y;
}

/* bit 4 of each of y's 8 bytes, gathered into bit i for byte i */
static inline ALWAYS_INLINE uint32_t bit4s(uint64_t y) {
    y = (y >> 4) & 0x0101010101010101ull;
    return (uint32_t)((y * 0x0102040810204080ull) >> 56);
}

enum { Q4_0 = 0, Q5_0 = 1, Q8_0 = 2 };
static const Py_ssize_t BLOCK_BYTES[3] = {18, 22, 34};

static inline ALWAYS_INLINE void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* one GGUF block (kind) at o from a column's 4 compressed-tensors words q[0..3] (8 consecutive k each), its
 * zero-point zv and fp16 scale bits dv. The codes less a 4-bit zero-point never leave Q5_0's or Q8_0's ranges:
 * nothing to clip. */
static inline ALWAYS_INLINE void gguf_block(uint8_t *o, const uint32_t q[4], unsigned zv, uint16_t dv, int kind) {
    memcpy(o, &dv, 2);
    uint64_t q0 = spread(q[0]), q1 = spread(q[1]), q2 = spread(q[2]), q3 = spread(q[3]);
    if (kind == Q4_0) {
        put64(o + 2, q0 | (q2 << 4));
        put64(o + 10, q1 | (q3 << 4));
        return;
    }
    uint64_t zz = 0x0101010101010101ull * zv;
    if (kind == Q8_0) { /* q - z as int8: (128 + q) - z never borrows across bytes; the xor makes it two's complement */
        const uint64_t bias = 0x8080808080808080ull;
        put64(o + 2, ((q0 | bias) - zz) ^ bias);
        put64(o + 10, ((q1 | bias) - zz) ^ bias);
        put64(o + 18, ((q2 | bias) - zz) ^ bias);
        put64(o + 26, ((q3 | bias) - zz) ^ bias);
        return;
    }
    /* Q5_0: q - z + 16 in [1, 31], no carry between bytes; bit 4 to qh (bit k for k), the low nibbles to qs */
    uint64_t add = 0x1010101010101010ull - zz;
    q0 += add; q1 += add; q2 += add; q3 += add;
    uint32_t qh = bit4s(q0) | (bit4s(q1) << 8) | (bit4s(q2) << 16) | ((uint32_t)bit4s(q3) << 24);
    memcpy(o + 2, &qh, 4);
    const uint64_t lo = 0x0F0F0F0F0F0F0F0Full;
    put64(o + 6, (q0 & lo) | ((q2 & lo) << 4));
    put64(o + 14, (q1 & lo) | ((q3 & lo) << 4));
}

/* GGUF blocks of rows of 4-bit codes in compressed-tensors' words (each word 8 consecutive k of one row, nibble i
 * = k 8 j + i): out row r from ct row rows[r] (or r), its blocks of 32 k, each block's zero-point z[r][block /
 * per_group] (uint8) and fp16 scale bits d[r][block]; ggml's block_q4_0 (every zero-point 8), q5_0, q8_0. Rows
 * [r0, r1) only. */
static void ct_to_gguf(const uint32_t *ct, Py_ssize_t kw, const int64_t *rows, const uint8_t *z, Py_ssize_t groups,
                       Py_ssize_t per_group, const uint16_t *d, int kind, uint8_t *out, Py_ssize_t r0, Py_ssize_t r1) {
    Py_ssize_t nb = kw / 4, bs = BLOCK_BYTES[kind];
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint32_t *w = ct + (rows ? rows[r] : r) * kw;
        const uint8_t *zr = z + r * groups;
        const uint16_t *dr = d + r * nb;
        uint8_t *o = out + r * nb * bs;
        for (Py_ssize_t b = 0; b < nb; b++, w += 4, o += bs)
            gguf_block(o, w, zr[b / per_group], dr[b], kind);
    }
}

/* AWQ words (K, C) -> GGUF blocks of the source columns of word columns [c0, c1), in one pass (awq_to_ct's lane
 * transpose, then each block as ct_to_gguf makes it, with no weight_packed rows in memory between): source column
 * col goes to out row rowof[col - 8 c0] (rowof NULL: col - 8 c0), each row nb = K/32 blocks; a block's zero-point
 * z[g][col - 8 c0] (uint8) and fp16 scale bits s[g][col - 8 c0] of its group g = 32 b / per (rows per group, a
 * multiple of 32): z and s (G, 8 (c1 - c0)), the checkpoint's columns of these words. Per tile of 16 word columns:
 * each block's 32 rows of 16 words read (one 64-byte line each), transposed in 4 groups of 8 rows, its 128 blocks
 * made (by TILE_BLOCKS: scalar, or 16 columns a vector in the AVX-512 build) and stored. The kind is a constant of
 * each inlined copy, so that no block tests it. */
#define AWQ_TO_GGUF_BODY(TILE_BLOCKS)                                                                                 \
    Py_ssize_t nb = k / 32, bs = BLOCK_BYTES[kind], row = nb * bs, m = 8 * (c1 - c0);                                  \
    uint32_t v[4][8][TILE]; /* [8-row group of the block][slot s][word in tile] */                                    \
    for (Py_ssize_t wt = c0; wt < c1; wt += TILE) {                                                                   \
        int nw = (int)(wt + TILE < c1 ? TILE : c1 - wt);                                                              \
        for (Py_ssize_t b = 0; b < nb; b++) {                                                                         \
            for (int h = 0; h < 4; h++) {                                                                             \
                const uint32_t *rows = src + (32 * b + 8 * h) * c + wt;                                               \
                for (int i = 0; i < 8; i++)                                                                           \
                    load_lanes(v[h][i], rows + i * c, nw);                                                            \
                transpose_lanes(v[h]);                                                                                \
            }                                                                                                         \
            Py_ssize_t g = 32 * b / per;                                                                              \
            TILE_BLOCKS(v, nw, 8 * (wt - c0), rowof, z + g * m, s + g * m, kind, out + b * bs, row);                  \
        }                                                                                                             \
    }

/* the tile's blocks, one column at a time: column r0 + 8 l + AWQ_ORDER[sl] (of these words' columns) to its output
 * row (rowof, else itself), at out + that row * row (out: this block's place in output row 0) */
static inline ALWAYS_INLINE void gguf_tile(uint32_t v[4][8][TILE], int nw, Py_ssize_t r0, const int64_t *rowof,
                                           const uint8_t *zg, const uint16_t *sg, int kind, uint8_t *out,
                                           Py_ssize_t row) {
    for (int l = 0; l < nw; l++)
        for (int sl = 0; sl < 8; sl++) {
            Py_ssize_t r = r0 + 8 * l + AWQ_ORDER[sl];
            uint32_t q[4] = {v[0][sl][l], v[1][sl][l], v[2][sl][l], v[3][sl][l]};
            gguf_block(out + (rowof ? rowof[r] : r) * row, q, zg[r], sg[r], kind);
        }
}

#define AWQ_TO_GGUF_ARGS const uint32_t *src, Py_ssize_t k, Py_ssize_t c, Py_ssize_t c0, Py_ssize_t c1, \
    const int64_t *rowof, const uint8_t *z, const uint16_t *s, Py_ssize_t per, int kind, uint8_t *out
static inline ALWAYS_INLINE void awq_to_gguf_plain_kind(AWQ_TO_GGUF_ARGS) { AWQ_TO_GGUF_BODY(gguf_tile) }
static void awq_to_gguf_plain(AWQ_TO_GGUF_ARGS) {
    switch (kind) {
    case Q4_0: awq_to_gguf_plain_kind(src, k, c, c0, c1, rowof, z, s, per, Q4_0, out); break;
    case Q5_0: awq_to_gguf_plain_kind(src, k, c, c0, c1, rowof, z, s, per, Q5_0, out); break;
    default: awq_to_gguf_plain_kind(src, k, c, c0, c1, rowof, z, s, per, Q8_0, out); break;
    }
}

#if WIDE_TRANSPOSES
/* 16 lanes' words (one per column) to their 8 nibbles one a byte, nibble i at byte i of a uint64: lanes 0-7 in
 * *lo, 8-15 in *hi */
WIDE static inline ALWAYS_INLINE void spread16(__m512i x, __m512i *lo, __m512i *hi) {
    const __m512i m = _mm512_set1_epi32(0x0F0F0F0F);
    __m512i a = _mm512_and_si512(x, m), b = _mm512_and_si512(_mm512_srli_epi32(x, 4), m);
    /* per 128 bits, a's and b's bytes alternately: lanes 0, 1, 4, 5, ... in e; 2, 3, 6, 7, ... in o */
    __m512i e = _mm512_unpacklo_epi8(a, b), o = _mm512_unpackhi_epi8(a, b);
    *lo = _mm512_permutex2var_epi64(e, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), o);
    *hi = _mm512_permutex2var_epi64(e, _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), o);
}

/* gguf_tile's blocks, 16 columns (the lanes l of slot sl) a vector: gguf_block's arithmetic in byte lanes, then each
 * column's block stored from a uint64 a part */
WIDE static inline ALWAYS_INLINE void gguf_tile_wide(uint32_t v[4][8][TILE], int nw, Py_ssize_t r0,
                                                     const int64_t *rowof, const uint8_t *zg, const uint16_t *sg,
                                                     int kind, uint8_t *out, Py_ssize_t row) {
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    uint64_t part[4][TILE];
    uint32_t qh[TILE];
    for (int sl = 0; sl < 8; sl++) {
        __m512i q[4][2];
        for (int h = 0; h < 4; h++)
            spread16(_mm512_loadu_si512(v[h][sl]), &q[h][0], &q[h][1]);
        if (kind != Q4_0) {
            uint64_t zz[TILE];
            for (int l = 0; l < TILE; l++)
                zz[l] = 0x0101010101010101ull * (l < nw ? zg[r0 + 8 * l + AWQ_ORDER[sl]] : 0);
            for (int j = 0; j < 2; j++) {
                __m512i zj = _mm512_loadu_si512(zz + 8 * j);
                if (kind == Q8_0) { /* q - z as int8: bytes subtract alone */
                    for (int h = 0; h < 4; h++)
                        _mm512_storeu_si512(part[h] + 8 * j, _mm512_sub_epi8(q[h][j], zj));
                    continue;
                }
                /* Q5_0: q - z + 16 in [1, 31]; bit 4 of each byte to qh, the low nibbles to qs as Q4_0's */
                __m512i add = _mm512_sub_epi8(_mm512_set1_epi8(16), zj);
                uint64_t bit4[4];
                for (int h = 0; h < 4; h++) {
                    q[h][j] = _mm512_add_epi8(q[h][j], add);
                    bit4[h] = _mm512_test_epi8_mask(q[h][j], _mm512_set1_epi8(0x10));
                    q[h][j] = _mm512_and_si512(q[h][j], lo4);
                }
                /* qh of lane e: byte e of each mask (a 4 x 8 byte transpose) */
                __m128i x = _mm_set_epi64x((long long)bit4[1], (long long)bit4[0]);
                __m128i y = _mm_set_epi64x((long long)bit4[3], (long long)bit4[2]);
                x = _mm_unpacklo_epi8(x, _mm_srli_si128(x, 8));
                y = _mm_unpacklo_epi8(y, _mm_srli_si128(y, 8));
                _mm_storeu_si128((__m128i *)(qh + 8 * j), _mm_unpacklo_epi16(x, y));
                _mm_storeu_si128((__m128i *)(qh + 8 * j + 4), _mm_unpackhi_epi16(x, y));
            }
        }
        if (kind != Q8_0)
            for (int j = 0; j < 2; j++) {
                _mm512_storeu_si512(part[0] + 8 * j, _mm512_or_si512(q[0][j], _mm512_slli_epi64(q[2][j], 4)));
                _mm512_storeu_si512(part[1] + 8 * j, _mm512_or_si512(q[1][j], _mm512_slli_epi64(q[3][j], 4)));
            }
        for (int l = 0; l < nw; l++) {
            Py_ssize_t r = r0 + 8 * l + AWQ_ORDER[sl];
            uint8_t *o = out + (rowof ? rowof[r] : r) * row;
            memcpy(o, sg + r, 2);
            if (kind == Q4_0) {
                put64(o + 2, part[0][l]);
                put64(o + 10, part[1][l]);
            } else if (kind == Q5_0) {
                memcpy(o + 2, qh + l, 4);
                put64(o + 6, part[0][l]);
                put64(o + 14, part[1][l]);
            } else {
                for (int h = 0; h < 4; h++)
                    put64(o + 2 + 8 * h, part[h][l]);
            }
        }
    }
}

WIDE static inline ALWAYS_INLINE void awq_to_gguf_wide_kind(AWQ_TO_GGUF_ARGS) { AWQ_TO_GGUF_BODY(gguf_tile_wide) }
WIDE static void awq_to_gguf_wide(AWQ_TO_GGUF_ARGS) {
    switch (kind) {
    case Q4_0: awq_to_gguf_wide_kind(src, k, c, c0, c1, rowof, z, s, per, Q4_0, out); break;
    case Q5_0: awq_to_gguf_wide_kind(src, k, c, c0, c1, rowof, z, s, per, Q5_0, out); break;
    default: awq_to_gguf_wide_kind(src, k, c, c0, c1, rowof, z, s, per, Q8_0, out); break;
    }
}
#endif

static void awq_to_gguf(AWQ_TO_GGUF_ARGS) {
#if WIDE_TRANSPOSES
    if (transposes_level()) {
        awq_to_gguf_wide(src, k, c, c0, c1, rowof, z, s, per, kind, out);
        return;
    }
#endif
    awq_to_gguf_plain(src, k, c, c0, c1, rowof, z, s, per, kind, out);
}

/* AWQ words to their 4-bit values, one byte each, in logical column order: word i's slot s (its nibble s) is byte
 * 8 i + AWQ_ORDER[s], so slots 0-3 are the even bytes and slots 4-7 the odd ones; words [i0, i1) */
static void awq_unpack_u8(const uint32_t *src, uint64_t *out, Py_ssize_t i0, Py_ssize_t i1) {
    for (Py_ssize_t i = i0; i < i1; i++) {
        uint64_t e = src[i] & 0xFFFFu, o = src[i] >> 16;
        e = (e | (e << 24)) & 0x000000FF000000FFull;
        o = (o | (o << 24)) & 0x000000FF000000FFull;
        e = (e | (e << 12)) & 0x000F000F000F000Full;
        o = (o | (o << 12)) & 0x000F000F000F000Full;
        out[i] = e | (o << 8); /* little-endian: byte j of out[i] is value 8 i + j */
    }
}

/* a * b and a + b of sizes: -1 where either is negative or the result would pass PY_SSIZE_T_MAX (no buffer is that
 * large: need() refuses it), so that a size computed from the arguments never wraps to a small count */
static Py_ssize_t mul(Py_ssize_t a, Py_ssize_t b) {
    return a < 0 || b < 0 || (a > 0 && b > PY_SSIZE_T_MAX / a) ? -1 : a * b;
}
static Py_ssize_t add(Py_ssize_t a, Py_ssize_t b) { return a < 0 || b < 0 || a > PY_SSIZE_T_MAX - b ? -1 : a + b; }
#define MUL3(a, b, c) mul(mul(a, b), c)
#define MUL4(a, b, c, d) mul(mul(mul(a, b), c), d)

/* a contiguous buffer of at least `need` bytes (-1: more than any buffer holds), or an error naming it */
static int need(Py_buffer *b, const char *name, Py_ssize_t bytes) {
    if (bytes < 0) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, needs more bytes than a buffer holds", name, b->len);
        return 0;
    }
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, needs %zd", name, b->len, bytes);
        return 0;
    }
    return 1;
}

static PyObject *py_awq_to_ct(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    Py_ssize_t k, c, c0, c1, g0, g1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnnw*nn:awq_to_ct", &src, &k, &c, &c0, &c1, &out, &g0, &g1))
        return NULL;
    PyObject *res = NULL;
    if (k <= 0 || k % 8 || c <= 0 || c0 < 0 || c1 > c || c0 >= c1 || g0 < 0 || g1 > k / 8 || g0 > g1) {
        PyErr_Format(PyExc_ValueError, "awq_to_ct: K %zd, C %zd, words [%zd, %zd), groups [%zd, %zd) disagree", k, c, c0,
                     c1, g0, g1);
    } else if (need(&src, "src", MUL3(4, k, c)) && need(&out, "out", MUL3(4 * 8, c1 - c0, k / 8))) {
        Py_BEGIN_ALLOW_THREADS
        awq_to_ct((const uint32_t *)src.buf, k, c, c0, c1, (uint32_t *)out.buf, g0, g1);
        Py_END_ALLOW_THREADS
        res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_awq_to_gptq(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    Py_ssize_t k, c, g0, g1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnw*nn:awq_to_gptq", &src, &k, &c, &out, &g0, &g1))
        return NULL;
    PyObject *res = NULL;
    if (k <= 0 || k % 8 || c <= 0 || g0 < 0 || g1 > k / 8 || g0 > g1) {
        PyErr_Format(PyExc_ValueError, "awq_to_gptq: K %zd, C %zd, groups [%zd, %zd) disagree", k, c, g0, g1);
    } else if (need(&src, "src", MUL3(4, k, c)) && need(&out, "out", MUL3(4, k, c))) {
        uint32_t *tmp = PyMem_RawMalloc(4 * (size_t)(8 * c));
        if (tmp == NULL) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS
            awq_to_gptq((const uint32_t *)src.buf, c, (uint32_t *)out.buf, g0, g1, tmp);
            Py_END_ALLOW_THREADS
            PyMem_RawFree(tmp);
            res = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_awq_unpack_u8(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    Py_ssize_t n, i0, i1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nw*nn:awq_unpack_u8", &src, &n, &out, &i0, &i1))
        return NULL;
    PyObject *res = NULL;
    if (n < 0 || i0 < 0 || i1 > n || i0 > i1) {
        PyErr_Format(PyExc_ValueError, "awq_unpack_u8: %zd words, [%zd, %zd) disagree", n, i0, i1);
    } else if (need(&src, "src", mul(4, n)) && need(&out, "out", mul(8, n))) {
        Py_BEGIN_ALLOW_THREADS
        awq_unpack_u8((const uint32_t *)src.buf, (uint64_t *)out.buf, i0, i1);
        Py_END_ALLOW_THREADS
        res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_ct_to_gguf(PyObject *self, PyObject *args) {
    Py_buffer ct, rows, z, d, out;
    Py_ssize_t n, kw, m, groups, r0, r1;
    int kind;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nny*y*nny*iw*nn:ct_to_gguf", &ct, &m, &kw, &rows, &z, &groups, &n, &d, &kind, &out,
                          &r0, &r1))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t nb = kw / 4;
    int permuted = rows.len > 0;
    if (kind < 0 || kind > 2 || kw <= 0 || kw % 4 || m <= 0 || n <= 0 || groups <= 0 || nb % groups || r0 < 0 ||
        r1 > n || r0 > r1 || (!permuted && m != n)) {
        PyErr_Format(PyExc_ValueError, "ct_to_gguf: rows %zd of %zd words, %zd out, %zd groups, kind %d, [%zd, %zd) "
                     "disagree", m, kw, n, groups, kind, r0, r1);
    } else if (need(&ct, "ct", MUL3(4, m, kw)) && (!permuted || need(&rows, "rows", mul(8, n))) &&
               need(&z, "z", mul(n, groups)) && need(&d, "d", MUL3(2, n, nb)) &&
               need(&out, "out", MUL3(n, nb, BLOCK_BYTES[kind]))) {
        const int64_t *rp = permuted ? (const int64_t *)rows.buf : NULL;
        int bad = 0;
        for (Py_ssize_t r = r0; permuted && r < r1; r++)
            bad |= rp[r] < 0 || rp[r] >= m;
        if (bad) {
            PyErr_Format(PyExc_ValueError, "ct_to_gguf: a row index outside [0, %zd)", m);
        } else {
            Py_BEGIN_ALLOW_THREADS
            ct_to_gguf((const uint32_t *)ct.buf, kw, rp, (const uint8_t *)z.buf, groups, nb / groups,
                       (const uint16_t *)d.buf, kind, (uint8_t *)out.buf, r0, r1);
            Py_END_ALLOW_THREADS
            res = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&ct);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&z);
    PyBuffer_Release(&d);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_awq_to_gguf(PyObject *self, PyObject *args) {
    Py_buffer src, rowof, z, sc, out;
    Py_ssize_t k, c, c0, c1, per;
    int kind;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*y*niw*:awq_to_gguf", &src, &k, &c, &c0, &c1, &rowof, &z, &sc, &per, &kind,
                          &out))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t m = 8 * (c1 - c0), groups = per > 0 ? k / per : 0;
    int permuted = rowof.len > 0;
    if (kind < 0 || kind > 2 || k <= 0 || k % 32 || c <= 0 || c0 < 0 || c1 > c || c0 >= c1 || per <= 0 || per % 32 ||
        k % per) {
        PyErr_Format(PyExc_ValueError, "awq_to_gguf: K %zd, C %zd, words [%zd, %zd), %zd rows a group, kind %d "
                     "disagree", k, c, c0, c1, per, kind);
    } else if (need(&src, "src", MUL3(4, k, c)) && (!permuted || need(&rowof, "rowof", mul(8, m))) &&
               need(&z, "z", mul(groups, m)) && need(&sc, "s", MUL3(2, groups, m)) &&
               need(&out, "out", MUL3(m, k / 32, BLOCK_BYTES[kind]))) {
        const int64_t *rp = permuted ? (const int64_t *)rowof.buf : NULL;
        int bad = 0;
        for (Py_ssize_t r = 0; permuted && r < m; r++)
            bad |= rp[r] < 0 || rp[r] >= m;
        if (bad) {
            PyErr_Format(PyExc_ValueError, "awq_to_gguf: an output row outside [0, %zd)", m);
        } else {
            Py_BEGIN_ALLOW_THREADS
            awq_to_gguf((const uint32_t *)src.buf, k, c, c0, c1, rp, (const uint8_t *)z.buf, (const uint16_t *)sc.buf,
                        per, kind, (uint8_t *)out.buf);
            Py_END_ALLOW_THREADS
            res = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&rowof);
    PyBuffer_Release(&z);
    PyBuffer_Release(&sc);
    PyBuffer_Release(&out);
    return res;
}

/* AWQ words to their dequantized values by look-up, in logical column order and row-major like the core's
 * dequantize_awq: out (K, 8C) row k, column 8 w + AWQ_ORDER[s] = table[k / gs][8 w + AWQ_ORDER[s]][nibble s of word
 * (k, w)], where the table holds, per (group, column), the 16 products (q - z) * s already rounded to the output
 * dtype (by NumPy, as the core rounds them: no float arithmetic here, so every bit is the core's). Words come as
 * rows of C words `stride` words apart (a device's block of a wider tensor, read in place); entries and outputs
 * are T (2 or 4 bytes); rows [r0, r1). */
#define AWQ_DEQUANT_ROWS(NAME, T)                                                                                    \
    static void NAME(const uint32_t *src, Py_ssize_t stride, Py_ssize_t c, const T *table, Py_ssize_t gs, T *out,      \
                     Py_ssize_t r0, Py_ssize_t r1) {                                                                  \
        Py_ssize_t n = 8 * c;                                                                                         \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                                        \
            const uint32_t *w = src + r * stride;                                                                     \
            const T *t = table + (r / gs) * n * 16;                                                                   \
            T *o = out + r * n;                                                                                       \
            for (Py_ssize_t j = 0; j < c; j++, t += 128, o += 8) {                                                    \
                uint32_t x = w[j];                                                                                    \
                o[0] = t[0 * 16 + (x & 15u)];                                                                         \
                o[2] = t[2 * 16 + ((x >> 4) & 15u)];                                                                  \
                o[4] = t[4 * 16 + ((x >> 8) & 15u)];                                                                  \
                o[6] = t[6 * 16 + ((x >> 12) & 15u)];                                                                 \
                o[1] = t[1 * 16 + ((x >> 16) & 15u)];                                                                 \
                o[3] = t[3 * 16 + ((x >> 20) & 15u)];                                                                 \
                o[5] = t[5 * 16 + ((x >> 24) & 15u)];                                                                 \
                o[7] = t[7 * 16 + (x >> 28)];                                                                         \
            }                                                                                                         \
        }                                                                                                             \
    }
AWQ_DEQUANT_ROWS(awq_dequant_rows16, uint16_t)
AWQ_DEQUANT_ROWS(awq_dequant_rows32, uint32_t)

static PyObject *py_awq_dequant(PyObject *self, PyObject *args) {
    Py_buffer src, table, out;
    Py_ssize_t off, stride, k, c, groups, gs, r0, r1;
    int size;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnny*nniw*nn:awq_dequant", &src, &off, &stride, &k, &c, &table, &groups, &gs, &size,
                          &out, &r0, &r1))
        return NULL;
    PyObject *res = NULL;
    if (k <= 0 || c <= 0 || off < 0 || stride < c || gs <= 0 || k % gs || groups != k / gs || (size != 2 && size != 4) ||
        r0 < 0 || r1 > k || r0 > r1) {
        PyErr_Format(PyExc_ValueError, "awq_dequant: K %zd, C %zd, offset %zd, stride %zd, %zd groups of %zd, size %d, "
                     "rows [%zd, %zd) disagree", k, c, off, stride, groups, gs, size, r0, r1);
    } else if (need(&src, "src", mul(4, add(add(off, mul(k - 1, stride)), c))) &&
               need(&table, "table", MUL4(size, groups, 8 * 16, c)) && need(&out, "out", MUL4(size, k, 8, c))) {
        const uint32_t *w = (const uint32_t *)src.buf + off;
        Py_BEGIN_ALLOW_THREADS
        if (size == 2)
            awq_dequant_rows16(w, stride, c, (const uint16_t *)table.buf, gs, (uint16_t *)out.buf, r0, r1);
        else
            awq_dequant_rows32(w, stride, c, (const uint32_t *)table.buf, gs, (uint32_t *)out.buf, r0, r1);
        Py_END_ALLOW_THREADS
        res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&table);
    PyBuffer_Release(&out);
    return res;
}

/* ---- MLX's differing-weight counts (packq/checkpoint/formats/mlx.py) ----
 * A weight of MLX's 4-bit weight (compressed-tensors' weight_packed layout: row n holds K codes, nibble i of word w is
 * k = 8 w + i) differs from the source's in an MLX arithmetic depending only on its code and its (row, group)'s scale
 * and zero-point, so the caller gives each (row, group) a mask: bit c set where code c differs in MLX's "cpu"
 * arithmetic, bit 16 + c where it differs in "metal". The counts are the weights whose code's bits are set. */

/* counts[0] ("cpu"), counts[1] ("metal") += over rows [ra, rb), words [wa, wb) (multiples of 4) of rows of kw words,
 * masks[r * groups + w / wpg] the mask of row r's word w (wpg words per group, a multiple of 4): word by word */
static void mlx_count_scalar(const uint32_t *ct, Py_ssize_t kw, const uint32_t *masks, Py_ssize_t groups, Py_ssize_t wpg,
                             Py_ssize_t ra, Py_ssize_t rb, Py_ssize_t wa, Py_ssize_t wb, uint64_t counts[2]) {
    for (Py_ssize_t r = ra; r < rb; r++) {
        const uint32_t *row = ct + r * kw;
        uint64_t acc = 0; /* "cpu" in the low 32 bits, "metal" in the high: at most K each */
        for (Py_ssize_t w = wa; w < wb; w++) {
            uint32_t m = masks[r * groups + w / wpg];
            uint64_t mm = (uint64_t)(m & 0xFFFFu) | ((uint64_t)(m >> 16) << 32);
            uint32_t x = row[w];
            for (int i = 0; i < 8; i++)
                acc += (mm >> ((x >> (4 * i)) & 15u)) & 0x0000000100000001ull;
        }
        counts[0] += acc & 0xFFFFFFFFull;
        counts[1] += acc >> 32;
    }
}

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <tmmintrin.h>
#define MLX_SSSE3 1
/* mlx_count_scalar by SSSE3's byte shuffle: each (row, group)'s mask as a 16-byte table (byte c: its "cpu" bit in bit
 * 0, its "metal" bit in bit 4), looked up for the 32 codes of 4 words at once (4 words lie in one group: groups are
 * 32, 64 or 128 codes), summed in bytes (at most 7 lookups of 2 codes per byte before a nibble could carry) */
__attribute__((target("ssse3"))) static void mlx_count_ssse3(const uint32_t *ct, Py_ssize_t kw, const uint32_t *masks,
                                                             Py_ssize_t groups, Py_ssize_t wpg, Py_ssize_t ra,
                                                             Py_ssize_t rb, Py_ssize_t wa, Py_ssize_t wb,
                                                             uint64_t counts[2]) {
    const __m128i lo = _mm_set1_epi8(0x0F), zero = _mm_setzero_si128();
    const __m128i sel = _mm_set_epi8((char)0x80, 64, 32, 16, 8, 4, 2, 1, (char)0x80, 64, 32, 16, 8, 4, 2, 1);
    const __m128i one = _mm_set1_epi8(1), sixteen = _mm_set1_epi8(16);
    __m128i cpu = zero, metal = zero;
    for (Py_ssize_t r = ra; r < rb; r++) {
        const uint32_t *row = ct + r * kw;
        const uint32_t *mr = masks + r * groups;
        __m128i acc = zero, table = zero;
        int n = 0;
        for (Py_ssize_t w = wa; w < wb; w += 4) {
            if (w == wa || w % wpg == 0) {
                uint32_t m = mr[w / wpg];
                __m128i c = _mm_set_epi64x((long long)(0x0101010101010101ull * ((m >> 8) & 0xFFu)),
                                           (long long)(0x0101010101010101ull * (m & 0xFFu)));
                __m128i t = _mm_set_epi64x((long long)(0x0101010101010101ull * ((m >> 24) & 0xFFu)),
                                           (long long)(0x0101010101010101ull * ((m >> 16) & 0xFFu)));
                table = _mm_or_si128(_mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(c, sel), sel), one),
                                     _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(t, sel), sel), sixteen));
            }
            __m128i x = _mm_loadu_si128((const __m128i *)(row + w));
            __m128i a = _mm_shuffle_epi8(table, _mm_and_si128(x, lo));
            __m128i b = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(x, 4), lo));
            acc = _mm_add_epi8(acc, _mm_add_epi8(a, b));
            if (++n == 7 || w + 4 >= wb) {
                cpu = _mm_add_epi64(cpu, _mm_sad_epu8(_mm_and_si128(acc, lo), zero));
                metal = _mm_add_epi64(metal, _mm_sad_epu8(_mm_and_si128(_mm_srli_epi16(acc, 4), lo), zero));
                acc = zero;
                n = 0;
            }
        }
    }
    uint64_t v[2];
    _mm_storeu_si128((__m128i *)v, cpu);
    counts[0] += v[0] + v[1];
    _mm_storeu_si128((__m128i *)v, metal);
    counts[1] += v[0] + v[1];
}

#include <immintrin.h>
/* the 16-byte tables (mlx_count_ssse3's) of masks lo and hi in the two halves: each mask's bytes broadcast by a
 * shuffle (cpu bits 0-15 to bytes 0-15, metal bits 16-31 likewise), then each byte's own bit tested */
__attribute__((target("avx2"))) static inline __m256i mlx_tables_avx2(uint32_t lo, uint32_t hi) {
    const __m256i ic = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1,
                                        1, 1, 1);
    const __m256i im = _mm256_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
                                        3, 3, 3);
    const __m256i sel = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, (char)0x80, 1, 2, 4, 8, 16, 32, 64, (char)0x80, 1, 2, 4, 8,
                                         16, 32, 64, (char)0x80, 1, 2, 4, 8, 16, 32, 64, (char)0x80);
    __m256i v = _mm256_set_epi32((int)hi, (int)hi, (int)hi, (int)hi, (int)lo, (int)lo, (int)lo, (int)lo);
    __m256i c = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, ic), sel), sel);
    __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, im), sel), sel);
    return _mm256_or_si256(_mm256_and_si256(c, _mm256_set1_epi8(1)), _mm256_and_si256(m, _mm256_set1_epi8(16)));
}

/* mlx_count_ssse3 on 32 bytes at once (AVX2's byte shuffle looks up each 16-byte half in its own table: the halves'
 * groups, which differ at groups of 32); 1.8x its speed at 4096 x 11008 (2026-12-02) */
__attribute__((target("avx2"))) static void mlx_count_avx2(const uint32_t *ct, Py_ssize_t kw, const uint32_t *masks,
                                                           Py_ssize_t groups, Py_ssize_t wpg, Py_ssize_t ra,
                                                           Py_ssize_t rb, Py_ssize_t wa, Py_ssize_t wb,
                                                           uint64_t counts[2]) {
    const __m256i lo = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    __m256i cpu = zero, metal = zero;
    for (Py_ssize_t r = ra; r < rb; r++) {
        const uint32_t *row = ct + r * kw;
        const uint32_t *mr = masks + r * groups;
        __m256i acc = zero, table = zero;
        Py_ssize_t g = -1;
        int n = 0;
        for (Py_ssize_t w = wa; w < wb; w += 8) {
            __m256i x;
            if (w + 8 <= wb) {
                Py_ssize_t g0 = w / wpg, g1 = (w + 4) / wpg;
                if (g0 != g || g1 != g0) {
                    table = mlx_tables_avx2(mr[g0], mr[g1]);
                    g = g1 == g0 ? g0 : -1;
                }
                x = _mm256_loadu_si256((const __m256i *)(row + w));
            } else { /* the last 4 words: the high half looks up zeros (code 0 of an empty table: nothing counted) */
                table = mlx_tables_avx2(mr[w / wpg], 0);
                x = _mm256_set_m128i(_mm_setzero_si128(), _mm_loadu_si128((const __m128i *)(row + w)));
            }
            __m256i a = _mm256_shuffle_epi8(table, _mm256_and_si256(x, lo));
            __m256i b = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), lo));
            acc = _mm256_add_epi8(acc, _mm256_add_epi8(a, b));
            if (++n == 7 || w + 8 >= wb) {
                cpu = _mm256_add_epi64(cpu, _mm256_sad_epu8(_mm256_and_si256(acc, lo), zero));
                metal = _mm256_add_epi64(metal, _mm256_sad_epu8(_mm256_and_si256(_mm256_srli_epi16(acc, 4), lo), zero));
                acc = zero;
                n = 0;
            }
        }
    }
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, cpu);
    counts[0] += v[0] + v[1] + v[2] + v[3];
    _mm256_storeu_si256((__m256i *)v, metal);
    counts[1] += v[0] + v[1] + v[2] + v[3];
}

/* the fastest count the CPU has: 2 AVX2, 1 SSSE3, 0 word by word */
static int mlx_simd(void) {
    static int have = -1;
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("avx2") ? 2 : __builtin_cpu_supports("ssse3") ? 1 : 0;
    }
    return have;
}
#else
#define MLX_SSSE3 0
static int mlx_simd(void) { return 0; }
#endif

static void mlx_count(const uint32_t *ct, Py_ssize_t kw, const uint32_t *masks, Py_ssize_t groups, Py_ssize_t wpg,
                      Py_ssize_t ra, Py_ssize_t rb, Py_ssize_t wa, Py_ssize_t wb, int simd, uint64_t counts[2]) {
#if MLX_SSSE3
    if (simd >= 2) {
        mlx_count_avx2(ct, kw, masks, groups, wpg, ra, rb, wa, wb, counts);
        return;
    }
    if (simd == 1) {
        mlx_count_ssse3(ct, kw, masks, groups, wpg, ra, rb, wa, wb, counts);
        return;
    }
#endif
    (void)simd;
    mlx_count_scalar(ct, kw, masks, groups, wpg, ra, rb, wa, wb, counts);
}

/* awq_to_ct, and each tile's 8 TILE rows x TILE_G words counted while they are in the cache (the words [g0, g1)
 * multiples of 4); masks: (8 (c1 - c0), groups), the output rows' */
static void awq_to_ct_mlx(const uint32_t *src, Py_ssize_t k, Py_ssize_t c, Py_ssize_t c0, Py_ssize_t c1, uint32_t *out,
                          Py_ssize_t g0, Py_ssize_t g1, const uint32_t *masks, Py_ssize_t groups, Py_ssize_t wpg, int simd,
                          uint64_t counts[2]) {
    Py_ssize_t kw = k / 8;
    for (Py_ssize_t gt = g0; gt < g1; gt += TILE_G) {
        Py_ssize_t ge = gt + TILE_G < g1 ? gt + TILE_G : g1;
        for (Py_ssize_t wt = c0; wt < c1; wt += TILE) {
            Py_ssize_t we = wt + TILE < c1 ? wt + TILE : c1;
            awq_to_ct(src, k, c, wt, we, out + 8 * (wt - c0) * kw, gt, ge);
            mlx_count(out, kw, masks, groups, wpg, 8 * (wt - c0), 8 * (we - c0), gt, ge, simd, counts);
        }
    }
}

/* the checks both entry points share: rows of kw words, groups of wpg words, words [g0, g1) */
static int mlx_args(const char *fn, Py_ssize_t kw, Py_ssize_t groups, Py_ssize_t g0, Py_ssize_t g1) {
    if (kw <= 0 || kw % 4 || groups <= 0 || kw % groups || (kw / groups) % 4 || g0 < 0 || g1 > kw || g0 > g1 || g0 % 4 ||
        g1 % 4) {
        PyErr_Format(PyExc_ValueError, "%s: rows of %zd words, %zd groups, words [%zd, %zd) disagree (groups of a "
                     "multiple of 4 words, the range whole chunks of 4)", fn, kw, groups, g0, g1);
        return 0;
    }
    return 1;
}

static PyObject *py_awq_to_ct_mlx(PyObject *self, PyObject *args) {
    Py_buffer src, out, masks;
    Py_ssize_t k, c, c0, c1, g0, g1, groups;
    int simd;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnnw*nny*ni:awq_to_ct_mlx", &src, &k, &c, &c0, &c1, &out, &g0, &g1, &masks, &groups,
                          &simd))
        return NULL;
    PyObject *res = NULL;
    if (k <= 0 || k % 8 || c <= 0 || c0 < 0 || c1 > c || c0 >= c1) {
        PyErr_Format(PyExc_ValueError, "awq_to_ct_mlx: K %zd, C %zd, words [%zd, %zd) disagree", k, c, c0, c1);
    } else if (mlx_args("awq_to_ct_mlx", k / 8, groups, g0, g1) && need(&src, "src", MUL3(4, k, c)) &&
               need(&out, "out", MUL3(4 * 8, c1 - c0, k / 8)) && need(&masks, "masks", MUL3(4 * 8, c1 - c0, groups))) {
        uint64_t counts[2] = {0, 0};
        simd = simd < mlx_simd() ? (simd < 0 ? 0 : simd) : mlx_simd();
        Py_BEGIN_ALLOW_THREADS
        awq_to_ct_mlx((const uint32_t *)src.buf, k, c, c0, c1, (uint32_t *)out.buf, g0, g1, (const uint32_t *)masks.buf,
                      groups, k / 8 / groups, simd, counts);
        Py_END_ALLOW_THREADS
        res = Py_BuildValue("KK", (unsigned long long)counts[0], (unsigned long long)counts[1]);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&masks);
    return res;
}

static PyObject *py_mlx_count(PyObject *self, PyObject *args) {
    Py_buffer ct, masks;
    Py_ssize_t n, kw, groups, r0, r1, g0, g1;
    int simd;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nny*nnnnni:mlx_count", &ct, &n, &kw, &masks, &groups, &r0, &r1, &g0, &g1, &simd))
        return NULL;
    PyObject *res = NULL;
    if (n <= 0 || r0 < 0 || r1 > n || r0 > r1) {
        PyErr_Format(PyExc_ValueError, "mlx_count: %zd rows, rows [%zd, %zd) disagree", n, r0, r1);
    } else if (mlx_args("mlx_count", kw, groups, g0, g1) && need(&ct, "ct", MUL3(4, n, kw)) &&
               need(&masks, "masks", MUL3(4, n, groups))) {
        uint64_t counts[2] = {0, 0};
        simd = simd < mlx_simd() ? (simd < 0 ? 0 : simd) : mlx_simd();
        Py_BEGIN_ALLOW_THREADS
        mlx_count((const uint32_t *)ct.buf, kw, (const uint32_t *)masks.buf, groups, kw / groups, r0, r1, g0, g1, simd,
                  counts);
        Py_END_ALLOW_THREADS
        res = Py_BuildValue("KK", (unsigned long long)counts[0], (unsigned long long)counts[1]);
    }
    PyBuffer_Release(&ct);
    PyBuffer_Release(&masks);
    return res;
}

/* masks (N, G) of rows [n0, n1) from a table of masks by (scale's 16 bits, zero-point): out[n][g] = table[bits[g][n] * zn
 * + z[g][n]], bits and z (G, N) as the source stores them (a gather and a transpose in one pass); returns 0 where a
 * zero-point is not below zn (nothing read outside the table) */
static int mlx_masks(const uint16_t *bits, const uint8_t *z, Py_ssize_t groups, Py_ssize_t n, const uint32_t *table,
                     Py_ssize_t zn, uint32_t *out, Py_ssize_t n0, Py_ssize_t n1) {
    int ok = 1;
    for (Py_ssize_t g = 0; g < groups; g++) {
        const uint16_t *b = bits + g * n;
        const uint8_t *zz = z + g * n;
        for (Py_ssize_t j = n0; j < n1; j++) {
            Py_ssize_t zj = zz[j];
            ok &= zj < zn;
            out[j * groups + g] = table[(Py_ssize_t)b[j] * zn + (zj < zn ? zj : 0)];
        }
    }
    return ok;
}

static PyObject *py_mlx_masks(PyObject *self, PyObject *args) {
    Py_buffer bits, z, table, out;
    Py_ssize_t groups, n, zn, n0, n1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nny*nw*nn:mlx_masks", &bits, &z, &groups, &n, &table, &zn, &out, &n0, &n1))
        return NULL;
    PyObject *res = NULL;
    if (groups <= 0 || n <= 0 || zn <= 0 || n0 < 0 || n1 > n || n0 > n1) {
        PyErr_Format(PyExc_ValueError, "mlx_masks: %zd groups, %zd columns, %zd zero-points, [%zd, %zd) disagree", groups,
                     n, zn, n0, n1);
    } else if (need(&bits, "bits", MUL3(2, groups, n)) && need(&z, "z", mul(groups, n)) &&
               need(&table, "table", mul(4 * 65536, zn)) && need(&out, "out", MUL3(4, n, groups))) {
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = mlx_masks((const uint16_t *)bits.buf, (const uint8_t *)z.buf, groups, n, (const uint32_t *)table.buf, zn,
                       (uint32_t *)out.buf, n0, n1);
        Py_END_ALLOW_THREADS
        if (ok)
            res = Py_NewRef(Py_None);
        else
            PyErr_Format(PyExc_ValueError, "mlx_masks: a zero-point of %zd or more", zn);
    }
    PyBuffer_Release(&bits);
    PyBuffer_Release(&z);
    PyBuffer_Release(&table);
    PyBuffer_Release(&out);
    return res;
}

/* The same values without the table where the CPU has AVX2 and F16C (x86-64 since 2013-2015), 8 columns a word at a
 * time: (q - z) exactly in float32 (|q - z| <= 15), times the scale (float16 scales widened exactly), rounded once
 * to the output by the hardware's round-to-nearest-even, as NumPy rounds float32 to float16 in the core. A float16
 * scale's product is exact in float32 (4 bits times 11), so the one rounding is the core's; a NaN's result is the
 * quiet NaN both give. kind 0: float16 scales -> float16, 1: float32 -> float32, 2: float16 -> float16 -> float32
 * (the core's cast after it). The rounding mode is set to the default for the call (MXCSR 0x1F80). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_DIRECT 1
__attribute__((target("avx2,f16c"))) static void awq_dequant_direct(const uint32_t *src, Py_ssize_t stride, Py_ssize_t c,
                                                                   const uint8_t *zeros, const void *scales, int kind,
                                                                   Py_ssize_t gs, void *out, Py_ssize_t r0, Py_ssize_t r1) {
    const __m256i shifts = _mm256_setr_epi32(0, 16, 4, 20, 8, 24, 12, 28); /* column j: nibble s, AWQ_ORDER[s] = j */
    const __m256i low = _mm256_set1_epi32(15);
    Py_ssize_t n = 8 * c;
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(0x1F80);
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint32_t *w = src + r * stride;
        Py_ssize_t g = r / gs;
        const uint8_t *z = zeros + g * n;
        for (Py_ssize_t j = 0; j < c; j++) {
            __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w[j]), shifts), low);
            __m256i zz = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z + 8 * j)));
            __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, zz));
            if (kind == 1) {
                __m256 p = _mm256_mul_ps(d, _mm256_loadu_ps((const float *)scales + g * n + 8 * j));
                _mm256_storeu_ps((float *)out + r * n + 8 * j, p);
                continue;
            }
            __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)scales + g * n + 8 * j)));
            /* (the rounding a literal: vcvtps2ph takes an immediate, which a const variable is not at -O0) */
            __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(d, sc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            if (kind == 0)
                _mm_storeu_si128((__m128i *)((uint16_t *)out + r * n + 8 * j), h);
            else
                _mm256_storeu_ps((float *)out + r * n + 8 * j, _mm256_cvtph_ps(h));
        }
    }
    _mm_setcsr(csr);
}

static int direct_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
#define HAVE_DIRECT 0
static int direct_supported(void) { return 0; }
#endif

static PyObject *py_has_direct(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(direct_supported());
}

static PyObject *py_awq_dequant_direct(PyObject *self, PyObject *args) {
    Py_buffer src, zeros, scales, out;
    Py_ssize_t off, stride, k, c, groups, gs, r0, r1;
    int kind;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*nniw*nn:awq_dequant_direct", &src, &off, &stride, &k, &c, &zeros, &scales, &groups,
                          &gs, &kind, &out, &r0, &r1))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t in = kind == 1 ? 4 : 2, osz = kind == 0 ? 2 : 4;
    if (!direct_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "awq_dequant_direct: this CPU lacks AVX2 and F16C (see has_direct())");
    } else if (k <= 0 || c <= 0 || off < 0 || stride < c || gs <= 0 || k % gs || groups != k / gs || kind < 0 || kind > 2 ||
               r0 < 0 || r1 > k || r0 > r1) {
        PyErr_Format(PyExc_ValueError, "awq_dequant_direct: K %zd, C %zd, offset %zd, stride %zd, %zd groups of %zd, kind %d, "
                     "rows [%zd, %zd) disagree", k, c, off, stride, groups, gs, kind, r0, r1);
    } else if (need(&src, "src", mul(4, add(add(off, mul(k - 1, stride)), c))) && need(&zeros, "zeros", MUL3(groups, 8, c)) &&
               need(&scales, "scales", MUL4(in, groups, 8, c)) && need(&out, "out", MUL4(osz, k, 8, c))) {
#if HAVE_DIRECT
        const uint32_t *w = (const uint32_t *)src.buf + off;
        Py_BEGIN_ALLOW_THREADS
        awq_dequant_direct(w, stride, c, (const uint8_t *)zeros.buf, scales.buf, kind, gs, out.buf, r0, r1);
        Py_END_ALLOW_THREADS
#endif
        res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&zeros);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&out);
    return res;
}

/* MLX's scales and biases from float16 scales s and zero-points z, both (G, N) as the source stores them: scales_out,
 * biases_out (N, G), transposed, as float16 bits (f32 == 0) or float32 (f32 == 1); biases -(s * z) computed in float32
 * and rounded once (RNE, F16C's conversion), scales converted exactly; columns [n0, n1). Exact against NumPy's
 * astype for every scale but NaNs, which py_mlx_scales_biases leaves to NumPy (F16C quiets a signalling NaN). */
#if MLX_SSSE3
__attribute__((target("avx,f16c"))) static void mlx_scales_biases(const uint16_t *s, const int16_t *z, Py_ssize_t groups,
                                                                  Py_ssize_t n, int f32, void *scales_out,
                                                                  void *biases_out, Py_ssize_t n0, Py_ssize_t n1) {
    float sv[8], bv[8];
    uint16_t bh[8];
    /* 8 columns at a time over every group: the output's 8 rows of G are written whole while in the cache (group by
     * group over all columns, each store was to another line: 1.3 ms a 32 x 11008 module against 2.3 for NumPy) */
    for (Py_ssize_t j = n0; j < n1; j += 8) {
        int m = (int)(n1 - j < 8 ? n1 - j : 8);
        for (Py_ssize_t g = 0; g < groups; g++) {
            uint16_t sh[8] = {0};
            float zf[8] = {0};
            memcpy(sh, s + g * n + j, 2 * (size_t)m);
            const int16_t *zg = z + g * n + j;
            for (int i = 0; i < m; i++)
                zf[i] = (float)zg[i];
            __m256 sf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sh));
            /* -(s * z) as NumPy's negative: the sign bit flipped (0 - x would give +0 for x = +0) */
            __m256 b = _mm256_xor_ps(_mm256_mul_ps(sf, _mm256_loadu_ps(zf)), _mm256_set1_ps(-0.0f));
            if (f32) {
                _mm256_storeu_ps(sv, sf);
                _mm256_storeu_ps(bv, b);
                for (int i = 0; i < m; i++) {
                    ((float *)scales_out)[(j + i) * groups + g] = sv[i];
                    ((float *)biases_out)[(j + i) * groups + g] = bv[i];
                }
            } else {
                _mm_storeu_si128((__m128i *)bh, _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                for (int i = 0; i < m; i++) {
                    ((uint16_t *)scales_out)[(j + i) * groups + g] = sh[i];
                    ((uint16_t *)biases_out)[(j + i) * groups + g] = bh[i];
                }
            }
        }
    }
}

static int mlx_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
}
#else
static int mlx_f16c(void) { return 0; }
#endif

static PyObject *py_mlx_scales_biases(PyObject *self, PyObject *args) {
    Py_buffer s, z, so, bo;
    Py_ssize_t groups, n, n0, n1;
    int f32;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nniw*w*nn:mlx_scales_biases", &s, &z, &groups, &n, &f32, &so, &bo, &n0, &n1))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t size = f32 ? 4 : 2;
    int nan = 0;
    Py_ssize_t cells = mul(groups, n);
    if (cells > 0 && s.len / 2 >= cells) /* a NaN scale (exponent all ones, a fraction): NumPy's */
        for (Py_ssize_t i = 0; i < cells; i++)
            nan |= (((const uint16_t *)s.buf)[i] & 0x7FFFu) > 0x7C00u;
    if (!mlx_f16c() || nan) {
        res = Py_NewRef(Py_False); /* no F16C, or a NaN: the caller computes them in NumPy */
    } else if (groups <= 0 || n <= 0 || n0 < 0 || n1 > n || n0 > n1 || (f32 != 0 && f32 != 1)) {
        PyErr_Format(PyExc_ValueError, "mlx_scales_biases: %zd groups, %zd columns, [%zd, %zd), f32 %d disagree", groups, n,
                     n0, n1, f32);
    } else if (need(&s, "s", mul(2, cells)) && need(&z, "z", mul(2, cells)) && need(&so, "scales_out", mul(size, cells)) &&
               need(&bo, "biases_out", mul(size, cells))) {
#if MLX_SSSE3
        Py_BEGIN_ALLOW_THREADS
        mlx_scales_biases((const uint16_t *)s.buf, (const int16_t *)z.buf, groups, n, f32, so.buf, bo.buf, n0, n1);
        Py_END_ALLOW_THREADS
#endif
        res = Py_NewRef(Py_True);
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&z);
    PyBuffer_Release(&so);
    PyBuffer_Release(&bo);
    return res;
}

static PyObject *py_transposes(PyObject *self, PyObject *args) {
    int level = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "|i:transposes", &level))
        return NULL;
    if (level < -1 || level > 1) {
        PyErr_Format(PyExc_ValueError, "transposes: level must be 0 (plain), 1 (AVX-512) or -1 (what the CPU has), got %d",
                     level);
        return NULL;
    }
    transposes_set = level;
    return PyLong_FromLong(transposes_level());
}

/* madvise(MADV_POPULATE_WRITE) (Linux 5.14) over the whole pages of a writable buffer, without the GIL: its pages
 * made present and writable in one call, as a write to each would, its bytes unchanged. False where the system
 * cannot (another OS, an older kernel, no memory left): the pages then fault as they are first written. */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
static PyObject *py_prefault(PyObject *self, PyObject *args) {
    Py_buffer b;
    int ok = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*:prefault", &b))
        return NULL;
#if defined(__linux__)
    {
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)b.buf;
        uintptr_t lo = (a + page - 1) & ~(page - 1), hi = (a + (uintptr_t)b.len) & ~(page - 1);
        ok = 1; /* no whole page: nothing to do */
        if (hi > lo) {
            int r;
            Py_BEGIN_ALLOW_THREADS
            r = madvise((void *)lo, hi - lo, MADV_POPULATE_WRITE);
            Py_END_ALLOW_THREADS
            ok = r == 0;
        }
    }
#endif
    PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"prefault", py_prefault, METH_VARARGS,
     "prefault(buf): the whole pages of the writable buffer buf made present (madvise MADV_POPULATE_WRITE), its bytes "
     "unchanged; releases the GIL. Returns whether they are (False: the system could not, as before Linux 5.14)."},
    {"transposes", py_transposes, METH_VARARGS,
     "transposes(level=-1): the level the word transposes (awq_to_ct, awq_to_gptq, awq_to_gguf, awq_to_ct_mlx) run at "
     "from now on, and returns it: 1 AVX-512 (F, BW, VL), 0 plain, capped at what this CPU has; -1: what the CPU "
     "has (the default)."},
    {"awq_to_ct", py_awq_to_ct, METH_VARARGS,
     "awq_to_ct(src, K, C, c0, c1, out, g0, g1): AWQ words (K, C) -> weight_packed rows of word columns [c0, c1), "
     "groups [g0, g1) of out (8 (c1 - c0), K/8); contiguous little-endian uint32 buffers; releases the GIL."},
    {"awq_to_gptq", py_awq_to_gptq, METH_VARARGS,
     "awq_to_gptq(src, K, C, out, g0, g1): AWQ words (K, C) -> GPTQ words (K/8, 8 C), groups [g0, g1); out may be "
     "src's own buffer; contiguous little-endian uint32 buffers; releases the GIL."},
    {"awq_unpack_u8", py_awq_unpack_u8, METH_VARARGS,
     "awq_unpack_u8(src, n, out, i0, i1): n AWQ words -> their 8 n values, one byte each, in logical column order, "
     "words [i0, i1); contiguous little-endian buffers; releases the GIL."},
    {"ct_to_gguf", py_ct_to_gguf, METH_VARARGS,
     "ct_to_gguf(ct, M, KW, rows, z, G, N, d, kind, out, r0, r1): GGUF blocks (kind 0 Q4_0, 1 Q5_0, 2 Q8_0) of "
     "out rows [r0, r1) of N, row r from ct row rows[r] of M (rows empty: r), KW words each; z (N, G) uint8 "
     "zero-points, d (N, KW/4) fp16 bits; releases the GIL."},
    {"awq_to_gguf", py_awq_to_gguf, METH_VARARGS,
     "awq_to_gguf(src, K, C, c0, c1, rowof, z, s, per, kind, out): GGUF blocks (kind 0 Q4_0, 1 Q5_0, 2 Q8_0) of "
     "the source columns of AWQ word columns [c0, c1) of src (K, C), column col to out row rowof[col - 8 c0] (rowof "
     "empty: col - 8 c0); z (G, 8 (c1 - c0)) uint8 zero-points and s (G, 8 (c1 - c0)) fp16 scale bits of those "
     "columns, groups of per rows; releases the GIL."},
    {"awq_dequant", py_awq_dequant, METH_VARARGS,
     "awq_dequant(src, off, stride, K, C, table, G, gs, size, out, r0, r1): AWQ words (K rows of C words, row k at word "
     "off + k stride of src) -> out (K, 8 C) of size-byte values table[k / gs][column][nibble], the table (G, 8 C, 16), "
     "G = K / gs; rows [r0, r1); little-endian buffers; releases the GIL."},
    {"has_direct", py_has_direct, METH_NOARGS, "has_direct(): whether awq_dequant_direct runs here (AVX2 and F16C)."},
    {"awq_dequant_direct", py_awq_dequant_direct, METH_VARARGS,
     "awq_dequant_direct(src, off, stride, K, C, zeros, scales, G, gs, kind, out, r0, r1): as awq_dequant without a "
     "table: zeros (G, 8 C) uint8, scales (G, 8 C) float16 (kind 0: out float16, 2: out float32) or float32 (kind 1); "
     "rows [r0, r1); little-endian buffers; releases the GIL."},
    {"awq_to_ct_mlx", py_awq_to_ct_mlx, METH_VARARGS,
     "awq_to_ct_mlx(src, K, C, c0, c1, out, g0, g1, masks, G, simd) -> (cpu, metal): awq_to_ct, and the written words "
     "[g0, g1) (multiples of 4) of its rows counted against masks (8 (c1 - c0), G) uint32 (bit c: code c differs in "
     "MLX's cpu arithmetic, bit 16 + c: in metal); simd: the most to use of 2 AVX2, 1 SSSE3, 0 word by word (what "
     "the CPU has, at most); releases the GIL."},
    {"mlx_count", py_mlx_count, METH_VARARGS,
     "mlx_count(ct, N, KW, masks, G, r0, r1, g0, g1, simd) -> (cpu, metal): the codes of rows [r0, r1), words [g0, "
     "g1) of 4-bit weight_packed words (N, KW) whose bits are set in masks (N, G) uint32 (as awq_to_ct_mlx; simd "
     "too); releases the GIL."},
    {"mlx_masks", py_mlx_masks, METH_VARARGS,
     "mlx_masks(bits, z, G, N, table, ZN, out, n0, n1): out (N, G) uint32 rows [n0, n1) = table[bits * ZN + z] of "
     "bits (G, N) uint16 and z (G, N) uint8 (every z below ZN, else ValueError); releases the GIL."},
    {"mlx_scales_biases", py_mlx_scales_biases, METH_VARARGS,
     "mlx_scales_biases(s, z, G, N, f32, scales_out, biases_out, n0, n1) -> bool: MLX's scales and biases (N, G) "
     "(float16 bits, or float32 with f32) of float16 scale bits s and int16 zero-points z (G, N), columns [n0, n1); "
     "False (nothing written) where the CPU has no F16C or a scale is NaN (NumPy's then); releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels", "packq's compiled CPU kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
