/* The memory reserve for the write-back and failover paths.
 *
 * A FUSE daemon that must allocate to write back pages the kernel is trying
 * to reclaim can deadlock. So at mount the node locks its memory, marks
 * itself an I/O flusher (PR_SET_IO_FLUSHER: its allocations may not recurse
 * into filesystem reclaim) and takes every buffer that flushing, fencing and
 * recovery need from a pool preallocated and touched here, page-aligned so
 * the buffers are usable for O_DIRECT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include "reserve.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

int cfs_mlockall(void)
{
    return mlockall(MCL_CURRENT | MCL_FUTURE) == 0 ? 0 : errno;
}

int cfs_set_io_flusher(void)
{
    return prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 ? 0 : errno;
}

struct cfs_pool {
    pthread_mutex_t lock;
    uint8_t *arena;
    size_t nbufs;
    size_t bufsize;
    size_t nfree;
    uint8_t **free;   /* stack of free buffers */
};

struct cfs_pool *cfs_pool_create(size_t nbufs, size_t bufsize)
{
    if (nbufs == 0 || bufsize == 0 || bufsize % 4096 != 0)
        return NULL;
    struct cfs_pool *pool = calloc(1, sizeof(*pool));
    if (!pool)
        return NULL;
    pool->free = calloc(nbufs, sizeof(uint8_t *));
    if (!pool->free || posix_memalign((void **)&pool->arena, 4096, nbufs * bufsize)) {
        free(pool->free);
        free(pool);
        return NULL;
    }
    memset(pool->arena, 0, nbufs * bufsize);  /* fault every page in now */
    pthread_mutex_init(&pool->lock, NULL);
    pool->nbufs = nbufs;
    pool->bufsize = bufsize;
    for (size_t i = 0; i < nbufs; i++)
        pool->free[i] = pool->arena + i * bufsize;
    pool->nfree = nbufs;
    return pool;
}

void cfs_pool_destroy(struct cfs_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_destroy(&pool->lock);
    free(pool->arena);
    free(pool->free);
    free(pool);
}

/* NULL when the reserve is exhausted: callers wait for a put, never malloc. */
uint8_t *cfs_pool_get(struct cfs_pool *pool)
{
    uint8_t *buf = NULL;
    pthread_mutex_lock(&pool->lock);
    if (pool->nfree)
        buf = pool->free[--pool->nfree];
    pthread_mutex_unlock(&pool->lock);
    return buf;
}

/* EINVAL for a pointer that is not one of this pool's buffers. */
int cfs_pool_put(struct cfs_pool *pool, uint8_t *buf)
{
    if (buf < pool->arena || buf >= pool->arena + pool->nbufs * pool->bufsize ||
        (size_t)(buf - pool->arena) % pool->bufsize)
        return EINVAL;
    pthread_mutex_lock(&pool->lock);
    int rc = pool->nfree < pool->nbufs ? 0 : EINVAL;
    if (!rc)
        pool->free[pool->nfree++] = buf;
    pthread_mutex_unlock(&pool->lock);
    return rc;
}

size_t cfs_pool_free_count(struct cfs_pool *pool) { return pool->nfree; }
size_t cfs_pool_bufsize(struct cfs_pool *pool) { return pool->bufsize; }
