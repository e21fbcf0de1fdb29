/* Little-endian loads/stores, a streaming copy and page faulting for spicewire/_codec.pyx.
 *
 * The loads go through memcpy so unaligned addresses are legal on every CPU; compilers turn them
 * into single moves. The streaming copy uses non-temporal stores on x86: a migration buffer of
 * hundreds of MiB is written once and sent, so pulling every destination line into the cache (the
 * read-for-ownership of a normal store) only costs bandwidth. */
#ifndef SPICEWIRE_FASTMEM_H
#define SPICEWIRE_FASTMEM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define SW_BSWAP16(x) __builtin_bswap16(x)
#define SW_BSWAP32(x) __builtin_bswap32(x)
#define SW_BSWAP64(x) __builtin_bswap64(x)
#else
#define SW_BSWAP16(x) (x)
#define SW_BSWAP32(x) (x)
#define SW_BSWAP64(x) (x)
#endif

static inline uint16_t sw_load_u16le(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return SW_BSWAP16(v); }
static inline uint32_t sw_load_u32le(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return SW_BSWAP32(v); }
static inline uint64_t sw_load_u64le(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return SW_BSWAP64(v); }
static inline void sw_store_u16le(unsigned char *p, uint16_t v) { v = SW_BSWAP16(v); memcpy(p, &v, 2); }
static inline void sw_store_u32le(unsigned char *p, uint32_t v) { v = SW_BSWAP32(v); memcpy(p, &v, 4); }
static inline void sw_store_u64le(unsigned char *p, uint64_t v) { v = SW_BSWAP64(v); memcpy(p, &v, 8); }

/* Copy n bytes without caching the destination. Callers issue sw_stream_fence() once after a batch
 * so the stores are visible before the buffer is handed to another thread. */
static inline void sw_copy_stream(unsigned char *dst, const unsigned char *src, size_t n)
{
#if defined(__SSE2__)
    size_t head = (size_t)(-(uintptr_t)dst) & 15;
    if (n < 256) {
        memcpy(dst, src, n);
        return;
    }
    memcpy(dst, src, head);
    dst += head; src += head; n -= head;
    while (n >= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + 0));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)(dst + 0), a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
        dst += 64; src += 64; n -= 64;
    }
    memcpy(dst, src, n);
#else
    memcpy(dst, src, n);
#endif
}

/* Store one value without caching its line: for output arrays too large to stay in cache, this
 * saves reading every line in before overwriting it. */
static inline void sw_stream_i64(int64_t *dst, int64_t v)
{
#if defined(__SSE2__) && defined(__x86_64__)
    _mm_stream_si64((long long *)dst, v);
#else
    *dst = v;
#endif
}

static inline void sw_stream_u32(uint32_t *dst, uint32_t v)
{
#if defined(__SSE2__)
    _mm_stream_si32((int *)dst, (int)v);
#else
    *dst = v;
#endif
}

static inline void sw_stream_fence(void)
{
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* Ask for the cache line at p ahead of its use. A hint, not a load: it never faults, wherever p
 * points (scan keeps it inside its input all the same). */
static inline void sw_prefetch(const unsigned char *p)
{
#if defined(__GNUC__)
    __builtin_prefetch(p);
#else
    (void)p;
#endif
}

/* Fault in the pages of [p, p + n) for writing, `step` bytes per system call, for memory nobody
 * else uses yet. MADV_POPULATE_WRITE (Linux 5.14) does what MAP_POPULATE does at mmap time, but
 * a step at a time: the kernel holds the process's mmap lock through one call, so a single call
 * for a GiB would make every other thread's mmap, munmap and brk wait for all of it. Where it is
 * refused (an older kernel), or `advise` is 0, each page is written in place (a byte read and
 * written back), one page fault each. */
#ifndef SW_MADV_POPULATE_WRITE
#define SW_MADV_POPULATE_WRITE 23
#endif

static inline void sw_fault_in(unsigned char *p, size_t n, size_t step, size_t page, int advise)
{
    uintptr_t at = (uintptr_t)p & ~(uintptr_t)(page - 1); /* madvise takes page-aligned starts */
    uintptr_t end = (uintptr_t)p + n;
    while (at < end) {
        uintptr_t upto = end - at > step ? at + step : end;
#if defined(__linux__)
        if (advise && madvise((void *)at, upto - at, SW_MADV_POPULATE_WRITE) != 0)
            advise = 0;
#else
        advise = 0;
#endif
        if (!advise) {
            uintptr_t q = at < (uintptr_t)p ? (uintptr_t)p : at;
            for (; q < upto; q = (q & ~(uintptr_t)(page - 1)) + page) {
                volatile unsigned char *b = (volatile unsigned char *)q;
                *b = *b;
            }
        }
        at = upto;
    }
}

#endif
