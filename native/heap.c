/* The process heap kept ready for the failover path.
 *
 * reserve.c locks memory and keeps a pool of I/O buffers. What a node allocates
 * besides them, while it takes over from a dead node or re-targets from a silent
 * server, must not need the kernel to find memory either (seeds 002, 003): the
 * kernel may be trying to free memory by writing back through this very mount.
 * Two kinds of allocation reach the kernel from a Python process:
 *
 * - malloc (objects over 512 bytes, buffers, C libraries): glibc grows its heap by
 *   brk, or mmaps a large request. cfs_heap_hold keeps everything in one arena
 *   (no per-thread arena of 64 MiB reserved address space each), serves requests
 *   up to 32 MiB from the heap, never gives the heap back (no trim), and grows it
 *   so that it holds `headroom` free bytes; cfs_heap_top_up restores that headroom
 *   whenever the failover path is not under way. Under mlockall the heap is
 *   locked as it grows, so its free part is resident and ready.
 * - pymalloc's arenas (every small Python object): 1 MiB mmaps, unmapped when
 *   empty. cfs_arenas_reserve puts an allocator in front of CPython's that keeps
 *   `count` arena slots mapped and touched; only while the failover path is under
 *   way (cfs_arenas_failover) are new arenas taken from it, so ordinary growth never
 *   eats the reserve; a reserve slot freed goes back to it, and cfs_arenas_top_up
 *   replaces the slots objects still pin once the path is over.
 *
 * This file uses CPython's full C API (the arena allocator is not in the limited
 * API the rest of the module is built for): the module is built where it runs.
 */
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "heap.h"

/* glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX) */
#define HOLD_MMAP_THRESHOLD (32u << 20)
/* heap growth in pieces below the threshold, so they come from the heap */
#define HOLD_PIECE (16u << 20)
#define HOLD_PIECES_MAX 256

/* At least `headroom` free bytes in the heap. Short of it, hold pieces adding up to
 * the whole headroom at once, then free them: what the free chunks could not give
 * came from a growing heap, so afterwards the heap has that much free whatever its
 * free chunks were (asking for the shortfall alone could be served by free chunks
 * and leave the heap as short as before). */
static int grow_free(size_t headroom)
{
    if (mallinfo2().fordblks >= headroom)
        return 0;
    void *pieces[HOLD_PIECES_MAX];
    size_t n = 0, have = 0;
    headroom += 64 << 10;     /* the chunks' own headers, and the top's */
    int err = 0;
    while (have < headroom && n < HOLD_PIECES_MAX) {
        size_t want = headroom - have < HOLD_PIECE ? headroom - have : HOLD_PIECE;
        void *p = malloc(want);
        if (!p) {
            err = ENOMEM;
            break;
        }
        memset(p, 0, want);   /* faulted in now (mlockall does it too) */
        pieces[n++] = p;
        have += want;
    }
    while (n)
        free(pieces[--n]);
    return err;
}

int cfs_heap_hold(size_t headroom)
{
    if (!mallopt(M_ARENA_MAX, 1) || !mallopt(M_TRIM_THRESHOLD, -1)
        || !mallopt(M_MMAP_THRESHOLD, HOLD_MMAP_THRESHOLD))
        return EINVAL;
    return grow_free(headroom);
}

int cfs_heap_top_up(size_t headroom)
{
    return grow_free(headroom);
}

/* out[0] heap bytes (brk), out[1] bytes in mmapped chunks, out[2] bytes in use,
 * out[3] free bytes in the heap, out[4] free bytes at its top */
void cfs_heap_stats(uint64_t *out)
{
    struct mallinfo2 mi = mallinfo2();
    out[0] = mi.arena;
    out[1] = mi.hblkhd;
    out[2] = mi.uordblks;
    out[3] = mi.fordblks;
    out[4] = mi.keepcost;
}

/* pymalloc's arena allocator and the reserve in front of it. pymalloc calls these
 * with the GIL held, so the counters and the free stack need no lock of their own;
 * the functions below called from Python (cffi lets the GIL go) take it.
 *
 * An arena is unmapped only when its last object dies, so a slot taken during a
 * failover may stay pinned by an object that lives on (a lock, a cached inode):
 * cfs_arenas_top_up maps new slots, outside the path, until `count` are free again.
 * Slots live in up to MAX_REGIONS mappings. */
#define MAX_REGIONS 64

static struct {
    PyObjectArenaAllocator next;    /* CPython's (mmap), for everything else */
    uint8_t *region[MAX_REGIONS];
    size_t region_slots[MAX_REGIONS];
    size_t nregions, slot, count, nfree;
    uint8_t **free;
    volatile int failover;
    int installed;
    uint64_t taken, fallback_allocs, fallback_during;
} arenas;

static int in_reserve(void *p)
{
    for (size_t i = 0; i < arenas.nregions; i++)
        if ((uint8_t *)p >= arenas.region[i]
            && (uint8_t *)p < arenas.region[i] + arenas.slot * arenas.region_slots[i])
            return 1;
    return 0;
}

static void *arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    if (arenas.failover && size <= arenas.slot && arenas.nfree) {
        arenas.taken++;
        return arenas.free[--arenas.nfree];
    }
    void *p = arenas.next.alloc(arenas.next.ctx, size);
    if (p) {
        arenas.fallback_allocs++;
        if (arenas.failover)
            arenas.fallback_during++;
    }
    return p;
}

static void arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (in_reserve(ptr)) {
        arenas.free[arenas.nfree++] = ptr;
        return;
    }
    arenas.next.free(arenas.next.ctx, ptr, size);
}

/* map `n` slots, touched; NULL if refused */
static uint8_t *map_slots(size_t n, size_t slot)
{
    void *region = mmap(NULL, n * slot, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED)
        return NULL;
    memset(region, 0, n * slot);
    return region;
}

/* with the GIL held: slots of a new region onto the free stack */
static void add_region(uint8_t *region, size_t n)
{
    arenas.region[arenas.nregions] = region;
    arenas.region_slots[arenas.nregions++] = n;
    for (size_t i = n; i-- > 0;)
        arenas.free[arenas.nfree++] = region + i * arenas.slot;
}

/* count 0: no reserve, but the arenas taken from the kernel are still counted */
int cfs_arenas_reserve(size_t count, size_t slot)
{
    if (arenas.installed || slot == 0 || slot % 4096)
        return EINVAL;
    /* every slot ever mapped can be free at once: count per region at most */
    uint8_t **stack = count ? calloc(count * MAX_REGIONS, sizeof(*stack)) : NULL;
    if (count && !stack)
        return ENOMEM;
    uint8_t *region = count ? map_slots(count, slot) : NULL;
    if (count && !region) {
        int err = errno;
        free(stack);
        return err;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    arenas.installed = 1;
    arenas.slot = slot;
    arenas.count = count;
    arenas.free = stack;
    if (region)
        add_region(region, count);
    PyObject_GetArenaAllocator(&arenas.next);
    PyObjectArenaAllocator mine = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&mine);
    PyGILState_Release(gil);
    return 0;
}

/* Outside the failover path: map slots until `count` are free. ENOSPC once
 * MAX_REGIONS mappings are made (the reserve then stays as it is). */
int cfs_arenas_top_up(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    size_t need = arenas.failover || !arenas.nregions || arenas.nfree >= arenas.count
        ? 0 : arenas.count - arenas.nfree;
    int full = arenas.nregions == MAX_REGIONS;
    PyGILState_Release(gil);
    if (!need)
        return 0;
    if (full)
        return ENOSPC;
    uint8_t *region = map_slots(need, arenas.slot);
    if (!region)
        return errno;
    gil = PyGILState_Ensure();
    add_region(region, need);
    PyGILState_Release(gil);
    return 0;
}

void cfs_arenas_failover(int on)
{
    arenas.failover = on;
}

/* out[0] slots, out[1] slots free, out[2] slots taken (ever), out[3] arenas from
 * the kernel since the reserve was made, out[4] of them while the failover path
 * was under way */
void cfs_arenas_stats(uint64_t *out)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    out[0] = arenas.count;
    out[1] = arenas.nfree;
    out[2] = arenas.taken;
    out[3] = arenas.fallback_allocs;
    out[4] = arenas.fallback_during;
    PyGILState_Release(gil);
}
