/* The few operations of the dispatch core that must be C: atomic loads and
 * stores with explicit ordering, a full fence, and the monotonic clock.
 *
 * Each ring has one producer and one consumer, so acquire/release pairs on
 * head and tail are enough to publish frame bytes.  The full fence is for
 * the doorbell handshake (see _dispatch.pyx), where each side stores one
 * word and then loads the other's: without a StoreLoad barrier both could
 * read a stale value and a wakeup would be lost.
 */
#ifndef POOLME_ATOMICS_H
#define POOLME_ATOMICS_H

#include <stdint.h>
#include <time.h>

static inline uint64_t pm_load_acquire(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void pm_store_release(volatile uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline int64_t pm_load_i64(const volatile int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void pm_store_i64(volatile int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Store desired at *p if it holds expected; true if it did. */
static inline int pm_cas_i64(volatile int64_t *p, int64_t expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline void pm_full_fence(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static inline int64_t pm_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
