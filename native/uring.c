/* A minimal io_uring for device flushes, on the raw system calls (no liburing).
 *
 * Why: an fdatasync made in a worker thread costs the event loop two thread
 * switches and a wakeup through trio (130-190 us on a 2-core VM, more than the
 * loop device's own write and flush); submitted here, the kernel runs it and
 * signals an eventfd the event loop waits on. Offered: FSYNC, and WRITE linked
 * before it (a small queued overwrite written and flushed in one submission).
 *
 * One submitter (the event loop's thread) and one reaper (the same thread), so the
 * rings need only the acquire/release pairs the kernel documents: the SQ tail is
 * published with release, the CQ tail read with acquire, the CQ head published
 * with release once the entries are copied out.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/io_uring.h>

#include "uring.h"

struct cfs_uring {
    int fd;
    unsigned sq_entries;
    unsigned sq_queued;         /* our tail: queued, published by cfs_uring_submit */
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_len, cq_len, sqes_len;
};

static void *map_ring(int fd, size_t len, off_t what)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, what);
    return p == MAP_FAILED ? NULL : p;
}

void cfs_uring_close(struct cfs_uring *r)
{
    if (!r)
        return;
    if (r->sqes)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_len);
    if (r->sq_map)
        munmap(r->sq_map, r->sq_len);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

struct cfs_uring *cfs_uring_open(unsigned entries, int eventfd, int *err)
{
    struct io_uring_params p;
    struct cfs_uring *r = calloc(1, sizeof *r);
    if (!r) {
        *err = ENOMEM;
        return NULL;
    }
    memset(&p, 0, sizeof p);
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) {
        *err = errno;
        free(r);
        return NULL;
    }
    r->sq_entries = p.sq_entries;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len)
            r->sq_len = r->cq_len;
        r->cq_len = r->sq_len;
    }
    r->sq_map = map_ring(r->fd, r->sq_len, IORING_OFF_SQ_RING);
    if (r->sq_map)
        r->cq_map = (p.features & IORING_FEAT_SINGLE_MMAP)
            ? r->sq_map : map_ring(r->fd, r->cq_len, IORING_OFF_CQ_RING);
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    if (r->cq_map)
        r->sqes = map_ring(r->fd, r->sqes_len, IORING_OFF_SQES);
    if (!r->sqes) {
        *err = errno ? errno : ENOMEM;
        cfs_uring_close(r);
        return NULL;
    }
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sq_queued = *r->sq_tail;
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_EVENTFD, &eventfd, 1) < 0) {
        *err = errno;
        cfs_uring_close(r);
        return NULL;
    }
    return r;
}

static struct io_uring_sqe *next_sqe(struct cfs_uring *r)
{
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sq_queued - head >= r->sq_entries)
        return NULL;
    unsigned idx = r->sq_queued & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    r->sq_array[idx] = idx;
    r->sq_queued++;
    return sqe;
}

/* Queue (not yet submit) an fsync of fd; its completion carries `tag`; with `link`
 * the next queued request starts only once it succeeded. 0, or -EBUSY when the
 * submission ring is full. */
int cfs_uring_queue_fsync(struct cfs_uring *r, int fd, int link, uint64_t tag)
{
    struct io_uring_sqe *sqe = next_sqe(r);
    if (!sqe)
        return -EBUSY;
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fd = fd;
    sqe->flags = link ? IOSQE_IO_LINK : 0;
    sqe->user_data = tag;
    return 0;
}

/* Queue a read or write of len bytes at buf, at offset of fd. */
static int queue_rw(struct cfs_uring *r, int opcode, int fd, const void *buf, uint32_t len,
                    uint64_t offset, int link, uint64_t tag)
{
    struct io_uring_sqe *sqe = next_sqe(r);
    if (!sqe)
        return -EBUSY;
    sqe->opcode = opcode;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len;
    sqe->off = offset;
    sqe->flags = link ? IOSQE_IO_LINK : 0;
    sqe->user_data = tag;
    return 0;
}

/* Queue a write of len bytes at buf to fd at offset; with `link` the next queued
 * request starts only once this one wrote all its bytes (a short or failed write
 * cancels it). */
int cfs_uring_queue_write(struct cfs_uring *r, int fd, const void *buf, uint32_t len,
                          uint64_t offset, int link, uint64_t tag)
{
    return queue_rw(r, IORING_OP_WRITE, fd, buf, len, offset, link, tag);
}

/* Queue a read of up to len bytes at offset of fd into buf (never linked: a read
 * depends on nothing queued with it). Its result is the bytes read (short at the
 * device's end) or -errno. */
int cfs_uring_queue_read(struct cfs_uring *r, int fd, void *buf, uint32_t len,
                         uint64_t offset, uint64_t tag)
{
    return queue_rw(r, IORING_OP_READ, fd, buf, len, offset, 0, tag);
}

/* Submit everything queued. 0, or -errno (what was queued stays queued). */
int cfs_uring_submit(struct cfs_uring *r)
{
    __atomic_store_n(r->sq_tail, r->sq_queued, __ATOMIC_RELEASE);
    for (;;) {
        unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        unsigned todo = r->sq_queued - head;
        if (!todo)
            return 0;
        long n = syscall(__NR_io_uring_enter, r->fd, todo, 0, 0, NULL, 0);
        if (n < 0 && errno != EINTR)
            return -errno;
        if (n == 0)
            return -EAGAIN;
    }
}

/* Block until at least `count` completions are ready to reap (closing with requests
 * in flight: their buffers must outlive them). 0 or -errno. */
int cfs_uring_wait(struct cfs_uring *r, unsigned count)
{
    for (;;) {
        unsigned ready = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) - *r->cq_head;
        if (ready >= count)
            return 0;
        long n = syscall(__NR_io_uring_enter, r->fd, 0, count - ready,
                         IORING_ENTER_GETEVENTS, NULL, 0);
        if (n < 0 && errno != EINTR)
            return -errno;
    }
}

/* Copy out up to `max` completions: their tags and results (0 or -errno). */
int cfs_uring_reap(struct cfs_uring *r, uint64_t *tags, int32_t *results, int max)
{
    unsigned head = *r->cq_head;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    int n = 0;
    while (head != tail && n < max) {
        struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        tags[n] = cqe->user_data;
        results[n] = cqe->res;
        head++;
        n++;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return n;
}
