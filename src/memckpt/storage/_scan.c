/*
 * memckpt.storage._scan: one pass over a staged chunk that computes its xxh3-64 digest
 * (seed 0, the default secret; the same value as xxhash.xxh3_64_intdigest) and tells
 * whether any element is NaN/Inf.
 *
 * The check is fused into the hash's stripe loop: every 32 bytes the hash loads are
 * also masked and compared, so the data is read from memory once. A value is
 * non-finite when (lane & mask) == value for a lane of `width` bytes (1, 2, 4 or 8),
 * which covers "exponent all ones" (float16/bfloat16/float32/float64) and the single
 * NaN patterns of the float8 types.
 *
 * Written from the XXH3 specification (xxHash's doc/xxhash_spec.md: long inputs are
 * 64-byte stripes accumulated into 8 lanes, scrambled every 16 stripes, merged and
 * avalanched). Inputs of 240 bytes or less return no digest: the caller hashes those
 * with the xxhash package. Python-side wrapper and fallback: memckpt.storage.scan.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define MCK_X86 1
#else
#define MCK_X86 0
#endif

#define STRIPE 64
#define SECRET_SIZE 192
#define STRIPES_PER_BLOCK ((SECRET_SIZE - STRIPE) / 8) /* 16 */
#define BLOCK (STRIPE * STRIPES_PER_BLOCK)             /* 1024 bytes */
#define MIDSIZE_MAX 240
#define PREFETCH 384 /* bytes ahead of the stripe being hashed */

static const uint64_t P32_1 = 0x9E3779B1U;
static const uint64_t P32_2 = 0x85EBCA77U;
static const uint64_t P32_3 = 0xC2B2AE3DU;
static const uint64_t P64_1 = 0x9E3779B185EBCA87ULL;
static const uint64_t P64_2 = 0xC2B2AE3D27D4EB4FULL;
static const uint64_t P64_3 = 0x165667B19E3779F9ULL;
static const uint64_t P64_4 = 0x85EBCA77C2B2AE63ULL;
static const uint64_t P64_5 = 0x27D4EB2F165667C5ULL;

/* The algorithm's default secret (a constant of XXH3, not a choice made here). */
static const uint8_t SECRET[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

static inline uint64_t read64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint64_t fold64(uint64_t a, uint64_t b) {
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

static inline uint64_t avalanche(uint64_t h) {
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
}

static uint64_t merge(const uint64_t acc[8], uint64_t len) {
    uint64_t r = len * P64_1;
    const uint8_t *s = SECRET + 11;
    for (int i = 0; i < 4; i++)
        r += fold64(acc[2 * i] ^ read64(s + 16 * i), acc[2 * i + 1] ^ read64(s + 16 * i + 8));
    return avalanche(r);
}

static void init_acc(uint64_t acc[8]) {
    acc[0] = P32_3; acc[1] = P64_1; acc[2] = P64_2; acc[3] = P64_3;
    acc[4] = P64_4; acc[5] = P32_2; acc[6] = P64_5; acc[7] = P32_1;
}

/* ---- the check, on 64-bit words (portable) --------------------------------------- */

/* mask and value repeated over a word; lane ones and lane top bits for the zero test */
typedef struct {
    int width; /* lane bytes: 1, 2, 4, 8; 0 = no check */
    uint64_t mask, value, ones, tops;
} check_t;

static check_t make_check(int width, uint64_t mask, uint64_t value) {
    check_t c = {width, 0, 0, 0, 0};
    if (width == 0) return c;
    int bits = 8 * width;
    uint64_t lane = bits == 64 ? ~0ULL : ((1ULL << bits) - 1);
    for (int b = 0; b < 64; b += bits) {
        c.mask |= (mask & lane) << b;
        c.value |= (value & lane) << b;
        c.ones |= 1ULL << b;
        c.tops |= 1ULL << (b + bits - 1);
    }
    return c;
}

/* nonzero when some lane of w has (lane & mask) == value: a lane of y is zero then,
   and (y - ones) & ~y & tops is nonzero exactly when some lane of y is zero */
static inline uint64_t word_bad(const check_t *c, uint64_t w) {
    uint64_t y = (w & c->mask) ^ c->value;
    return (y - c->ones) & ~y & c->tops;
}

static int check_portable(const check_t *c, const uint8_t *p, size_t n) {
    uint64_t bad = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) bad |= word_bad(c, read64(p + i));
    for (; i < n; i += (size_t)c->width) { /* the whole lanes left over */
        uint64_t lane = 0;
        memcpy(&lane, p + i, (size_t)c->width); /* little-endian hosts (x86, arm64) */
        uint64_t lm = c->width == 8 ? ~0ULL : ((1ULL << (8 * c->width)) - 1);
        if ((lane & c->mask & lm) == (c->value & lm)) bad = 1;
    }
    return bad == 0;
}

/* ---- portable long hash, check fused ---------------------------------------------- */

static inline void stripe_portable(uint64_t acc[8], const uint8_t *in, const uint8_t *key,
                                   const check_t *c, uint64_t *bad) {
    for (int i = 0; i < 8; i++) {
        uint64_t d = read64(in + 8 * i);
        uint64_t dk = d ^ read64(key + 8 * i);
        acc[i ^ 1] += d;
        acc[i] += (dk & 0xFFFFFFFFULL) * (dk >> 32);
        if (c->width) *bad |= word_bad(c, d);
    }
}

static inline void scramble_portable(uint64_t acc[8]) {
    const uint8_t *key = SECRET + SECRET_SIZE - STRIPE;
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= read64(key + 8 * i);
        acc[i] = a * P32_1;
    }
}

static uint64_t long_portable(const uint8_t *in, size_t n, const check_t *c, int *finite) {
    uint64_t acc[8], bad = 0;
    init_acc(acc);
    size_t blocks = (n - 1) / BLOCK;
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t *p = in + b * BLOCK;
        for (int s = 0; s < STRIPES_PER_BLOCK; s++) {
            __builtin_prefetch(p + s * STRIPE + PREFETCH);
            stripe_portable(acc, p + s * STRIPE, SECRET + 8 * s, c, &bad);
        }
        scramble_portable(acc);
    }
    size_t last = blocks * BLOCK, stripes = (n - 1 - last) / STRIPE;
    for (size_t s = 0; s < stripes; s++)
        stripe_portable(acc, in + last + s * STRIPE, SECRET + 8 * s, c, &bad);
    stripe_portable(acc, in + n - STRIPE, SECRET + SECRET_SIZE - STRIPE - 7, c, &bad);
    *finite = bad == 0;
    return merge(acc, (uint64_t)n);
}

/* ---- AVX2 long hash and check ----------------------------------------------------- */

#if MCK_X86
#define AVX2 __attribute__((target("avx2")))

/* the check of one 32-byte vector, for a lane width known at compile time */
#define CHECK_VEC(W, d, maskv, valv, badv)                                               \
    do {                                                                                 \
        __m256i m_ = _mm256_and_si256((d), (maskv));                                     \
        __m256i e_ = (W) == 1   ? _mm256_cmpeq_epi8(m_, (valv))                          \
                     : (W) == 2 ? _mm256_cmpeq_epi16(m_, (valv))                         \
                     : (W) == 4 ? _mm256_cmpeq_epi32(m_, (valv))                         \
                                : _mm256_cmpeq_epi64(m_, (valv));                        \
        (badv) = _mm256_or_si256((badv), e_);                                            \
    } while (0)

static inline AVX2 __attribute__((always_inline)) void stripe_avx2(
    __m256i acc[2], const uint8_t *in, const uint8_t *key, const int W, __m256i maskv,
    __m256i valv, __m256i *badv) {
    for (int i = 0; i < 2; i++) {
        __m256i d = _mm256_loadu_si256((const __m256i *)(in + 32 * i));
        __m256i k = _mm256_loadu_si256((const __m256i *)(key + 32 * i));
        __m256i dk = _mm256_xor_si256(d, k);
        __m256i hi = _mm256_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
        __m256i prod = _mm256_mul_epu32(dk, hi);
        __m256i swap = _mm256_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
        acc[i] = _mm256_add_epi64(prod, _mm256_add_epi64(acc[i], swap));
        if (W) CHECK_VEC(W, d, maskv, valv, *badv);
    }
}

static inline AVX2 __attribute__((always_inline)) void scramble_avx2(__m256i acc[2]) {
    const __m256i prime = _mm256_set1_epi32((int)P32_1);
    const uint8_t *key = SECRET + SECRET_SIZE - STRIPE;
    for (int i = 0; i < 2; i++) {
        __m256i a = acc[i];
        a = _mm256_xor_si256(a, _mm256_srli_epi64(a, 47));
        a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(key + 32 * i)));
        __m256i hi = _mm256_shuffle_epi32(a, _MM_SHUFFLE(0, 3, 0, 1));
        __m256i lo_p = _mm256_mul_epu32(a, prime);
        __m256i hi_p = _mm256_mul_epu32(hi, prime);
        acc[i] = _mm256_add_epi64(lo_p, _mm256_slli_epi64(hi_p, 32));
    }
}

static inline AVX2 __attribute__((always_inline)) uint64_t long_avx2_w(
    const uint8_t *in, size_t n, const int W, const check_t *c, int *finite) {
    uint64_t init[8], out[8];
    init_acc(init);
    __m256i acc[2] = {_mm256_loadu_si256((const __m256i *)init),
                      _mm256_loadu_si256((const __m256i *)(init + 4))};
    __m256i maskv = _mm256_set1_epi64x((long long)c->mask);
    __m256i valv = _mm256_set1_epi64x((long long)c->value);
    __m256i badv = _mm256_setzero_si256();
    size_t blocks = (n - 1) / BLOCK;
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t *p = in + b * BLOCK;
        for (int s = 0; s < STRIPES_PER_BLOCK; s++) {
            __builtin_prefetch(p + s * STRIPE + PREFETCH);
            stripe_avx2(acc, p + s * STRIPE, SECRET + 8 * s, W, maskv, valv, &badv);
        }
        scramble_avx2(acc);
    }
    size_t last = blocks * BLOCK, stripes = (n - 1 - last) / STRIPE;
    for (size_t s = 0; s < stripes; s++)
        stripe_avx2(acc, in + last + s * STRIPE, SECRET + 8 * s, W, maskv, valv, &badv);
    stripe_avx2(acc, in + n - STRIPE, SECRET + SECRET_SIZE - STRIPE - 7, W, maskv, valv, &badv);
    _mm256_storeu_si256((__m256i *)out, acc[0]);
    _mm256_storeu_si256((__m256i *)(out + 4), acc[1]);
    *finite = _mm256_testz_si256(badv, badv);
    return merge(out, (uint64_t)n);
}

static AVX2 uint64_t long_avx2(const uint8_t *in, size_t n, const check_t *c, int *finite) {
    switch (c->width) {
    case 1: return long_avx2_w(in, n, 1, c, finite);
    case 2: return long_avx2_w(in, n, 2, c, finite);
    case 4: return long_avx2_w(in, n, 4, c, finite);
    case 8: return long_avx2_w(in, n, 8, c, finite);
    default: return long_avx2_w(in, n, 0, c, finite);
    }
}

static inline AVX2 __attribute__((always_inline)) int check_avx2_w(
    const uint8_t *p, size_t n, const int W, const check_t *c) {
    __m256i maskv = _mm256_set1_epi64x((long long)c->mask);
    __m256i valv = _mm256_set1_epi64x((long long)c->value);
    __m256i b0 = _mm256_setzero_si256(), b1 = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i d0 = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        CHECK_VEC(W, d0, maskv, valv, b0);
        CHECK_VEC(W, d1, maskv, valv, b1);
    }
    b0 = _mm256_or_si256(b0, b1);
    if (!_mm256_testz_si256(b0, b0)) return 0;
    return check_portable(c, p + i, n - i);
}

static AVX2 int check_avx2(const uint8_t *p, size_t n, const check_t *c) {
    switch (c->width) {
    case 1: return check_avx2_w(p, n, 1, c);
    case 2: return check_avx2_w(p, n, 2, c);
    case 4: return check_avx2_w(p, n, 4, c);
    default: return check_avx2_w(p, n, 8, c);
    }
}

/* ---- AVX-512 long hash and check (avx512f + avx512bw) ------------------------------ */

#define AVX512 __attribute__((target("avx512f,avx512bw")))

static inline AVX512 __attribute__((always_inline)) uint64_t check_vec512(
    __m512i d, const int W, __m512i maskv, __m512i valv) {
    __m512i m = _mm512_and_si512(d, maskv);
    return W == 1   ? (uint64_t)_mm512_cmpeq_epi8_mask(m, valv)
           : W == 2 ? (uint64_t)_mm512_cmpeq_epi16_mask(m, valv)
           : W == 4 ? (uint64_t)_mm512_cmpeq_epi32_mask(m, valv)
                    : (uint64_t)_mm512_cmpeq_epi64_mask(m, valv);
}

static inline AVX512 __attribute__((always_inline)) void stripe_512(
    __m512i *acc, const uint8_t *in, const uint8_t *key, const int W, __m512i maskv,
    __m512i valv, uint64_t *bad) {
    __m512i d = _mm512_loadu_si512((const void *)in);
    __m512i dk = _mm512_xor_si512(d, _mm512_loadu_si512((const void *)key));
    __m512i hi = _mm512_shuffle_epi32(dk, (_MM_PERM_ENUM)_MM_SHUFFLE(0, 3, 0, 1));
    __m512i prod = _mm512_mul_epu32(dk, hi);
    __m512i swap = _mm512_shuffle_epi32(d, (_MM_PERM_ENUM)_MM_SHUFFLE(1, 0, 3, 2));
    *acc = _mm512_add_epi64(prod, _mm512_add_epi64(*acc, swap));
    if (W) *bad |= check_vec512(d, W, maskv, valv);
}

static inline AVX512 __attribute__((always_inline)) void scramble_512(__m512i *acc) {
    const __m512i prime = _mm512_set1_epi32((int)P32_1);
    __m512i a = *acc;
    a = _mm512_xor_si512(a, _mm512_srli_epi64(a, 47));
    a = _mm512_xor_si512(a, _mm512_loadu_si512((const void *)(SECRET + SECRET_SIZE - STRIPE)));
    __m512i hi = _mm512_shuffle_epi32(a, (_MM_PERM_ENUM)_MM_SHUFFLE(0, 3, 0, 1));
    __m512i lo_p = _mm512_mul_epu32(a, prime);
    __m512i hi_p = _mm512_mul_epu32(hi, prime);
    *acc = _mm512_add_epi64(lo_p, _mm512_slli_epi64(hi_p, 32));
}

static inline AVX512 __attribute__((always_inline)) uint64_t long_512_w(
    const uint8_t *in, size_t n, const int W, const check_t *c, int *finite) {
    uint64_t init[8], out[8], bad = 0;
    init_acc(init);
    __m512i acc = _mm512_loadu_si512((const void *)init);
    __m512i maskv = _mm512_set1_epi64((long long)c->mask);
    __m512i valv = _mm512_set1_epi64((long long)c->value);
    size_t blocks = (n - 1) / BLOCK;
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t *p = in + b * BLOCK;
        for (int s = 0; s < STRIPES_PER_BLOCK; s++) {
            __builtin_prefetch(p + s * STRIPE + PREFETCH);
            stripe_512(&acc, p + s * STRIPE, SECRET + 8 * s, W, maskv, valv, &bad);
        }
        scramble_512(&acc);
    }
    size_t last = blocks * BLOCK, stripes = (n - 1 - last) / STRIPE;
    for (size_t s = 0; s < stripes; s++)
        stripe_512(&acc, in + last + s * STRIPE, SECRET + 8 * s, W, maskv, valv, &bad);
    stripe_512(&acc, in + n - STRIPE, SECRET + SECRET_SIZE - STRIPE - 7, W, maskv, valv, &bad);
    _mm512_storeu_si512((void *)out, acc);
    *finite = bad == 0;
    return merge(out, (uint64_t)n);
}

static AVX512 uint64_t long_512(const uint8_t *in, size_t n, const check_t *c, int *finite) {
    switch (c->width) {
    case 1: return long_512_w(in, n, 1, c, finite);
    case 2: return long_512_w(in, n, 2, c, finite);
    case 4: return long_512_w(in, n, 4, c, finite);
    case 8: return long_512_w(in, n, 8, c, finite);
    default: return long_512_w(in, n, 0, c, finite);
    }
}
#endif

/* the widest vectors this CPU has (and set_simd allows): 0 portable, 2 AVX2, 3 AVX-512 */
static int simd = 0;

static uint64_t long_hash(const uint8_t *p, size_t n, const check_t *c, int *finite) {
#if MCK_X86
    if (simd >= 3) return long_512(p, n, c, finite);
    if (simd >= 2) return long_avx2(p, n, c, finite);
#endif
    return long_portable(p, n, c, finite);
}

static int check_only(const uint8_t *p, size_t n, const check_t *c) {
#if MCK_X86
    if (simd >= 2) return check_avx2(p, n, c);
#endif
    return check_portable(c, p, n);
}

static int best_simd(void) {
#if MCK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 3;
    if (__builtin_cpu_supports("avx2")) return 2;
#endif
    return 0;
}

/* ---- Python ----------------------------------------------------------------------- */

PyDoc_STRVAR(scan_doc,
"scan(buffer, hashed, width, mask, value) -> (digest or None, finite)\n\n"
"One pass over ``buffer``: its xxh3-64 digest when ``hashed`` and it is longer than\n"
"240 bytes (else None), and False when some ``width``-byte little-endian lane has\n"
"``lane & mask == value`` (width 0: no check, always True). Releases the GIL.");

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    int hashed, width;
    unsigned long long mask, value;
    if (!PyArg_ParseTuple(args, "y*piKK", &view, &hashed, &width, &mask, &value)) return NULL;
    if (!(width == 0 || width == 1 || width == 2 || width == 4 || width == 8)) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "width must be 0, 1, 2, 4 or 8, not %d", width);
    }
    size_t n = (size_t)view.len;
    if (width && n % (size_t)width) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "%zu bytes are not whole %d-byte lanes", n, width);
    }
    const uint8_t *p = (const uint8_t *)view.buf;
    check_t c = make_check(width, mask, value);
    uint64_t digest = 0;
    int finite = 1, have_digest = hashed && n > MIDSIZE_MAX;
    Py_BEGIN_ALLOW_THREADS
    if (have_digest)
        digest = long_hash(p, n, &c, &finite);
    else if (width)
        finite = check_only(p, n, &c);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (have_digest) return Py_BuildValue("(KO)", (unsigned long long)digest, finite ? Py_True : Py_False);
    return Py_BuildValue("(OO)", Py_None, finite ? Py_True : Py_False);
}

static PyObject *set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    long want = PyLong_AsLong(arg);
    if (want == -1 && PyErr_Occurred()) return NULL;
    int best = best_simd();
    simd = want < best ? (want >= 2 ? 2 : 0) : best;
    return PyLong_FromLong(simd);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {"set_simd", set_simd, METH_O,
     "set_simd(level) -> int: use vectors up to ``level`` (0 portable, 2 AVX2, 3 AVX-512)\n"
     "where the CPU has them; returns the level in use. The default is the best one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan",
                                    "Fused xxh3-64 and NaN/Inf check (see scan.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scan(void) {
    simd = best_simd();
    return PyModule_Create(&module);
}
