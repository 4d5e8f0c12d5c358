/* The DLM lock table hot path: resources, queues, grantability.
 *
 * One table per lockspace on its master node. A resource (rsb) is found by
 * name in a hash table; it has three queues, as in the Linux DLM: granted,
 * converting (granted at grmode, wanting rqmode) and waiting (new requests).
 * Locks are found by their 64-bit id (unique cluster-wide; the owner node
 * picks it) in a second hash table.
 *
 * Rules (see docs/locking.md):
 *  - two locks conflict when their ranges overlap and their modes clash;
 *  - a conversion compatible with every other holder (granted or converting,
 *    at its grmode) when it is asked for is granted in place at once; one that
 *    has to wait joins the convert queue, which is granted in order: it also
 *    waits for every OLDER queued conversion whose wanted mode clashes with its
 *    own (range-aware FIFO, the Linux DLM's "6-3" rule). After recovery the
 *    rebuilt queue is not the old order, so until it drains it is granted in
 *    any order (as Linux's dlm_recover_grant). Conversions go before new requests;
 *  - a new request is granted only if compatible with every holder, with
 *    every conversion's wanted mode, and with every OLDER waiter (FIFO, so an
 *    EX waiter is never starved by a stream of PRs);
 *  - a conversion that would close a cycle of conversions waiting for each
 *    other (on a granted mode, or on queue order) fails with -EDEADLK and the
 *    lock keeps its granted mode;
 *  - every holder that blocks a queued lock gets one blocking event (BAST)
 *    per increase of the mode wanted from it.
 * Events (grants and basts) are queued in the table; the caller drains them
 * with cfs_lt_next_event() after each call.
 *
 * Idle resources (no locks left) are kept, with their LVB, on a toss list in
 * the order they went idle, stamped with the caller's epoch (like the Linux
 * DLM's toss list); the caller frees the ones idle long enough
 * (cfs_lt_idle_resource + cfs_lt_drop_resource). A new lock takes a resource
 * off the toss list again.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "locktable.h"

#define LVB_LEN 32
#define NMODES 6
#define EV_GRANT 1
#define EV_BAST 2
#define EV_DEADLOCK 3   /* a queued conversion refused (-EDEADLK) after the fact */
#define Q_NONE 0
#define Q_GRANT 1
#define Q_CONVERT 2
#define Q_WAIT 3
#define F_TRY 1

static const unsigned char compat[NMODES][NMODES] = {
    /* NL CR CW PR PW EX */
    {1, 1, 1, 1, 1, 1}, /* NL */
    {1, 1, 1, 1, 1, 0}, /* CR */
    {1, 1, 1, 0, 0, 0}, /* CW */
    {1, 1, 0, 1, 0, 0}, /* PR */
    {1, 1, 0, 0, 0, 0}, /* PW */
    {1, 0, 0, 0, 0, 0}, /* EX */
};

struct lt_res;

struct lt_lock {
    uint64_t lkb_id;
    uint32_t lkb_nodeid;
    int lkb_grmode; /* -1: not granted */
    int lkb_rqmode; /* -1: nothing wanted */
    int lkb_highbast; /* highest mode a bast was sent for since the last grant, -1 none */
    int lkb_queue;
    unsigned lkb_mark;
    uint64_t lkb_start, lkb_end;
    struct lt_res *lkb_res;
    struct lt_lock *lkb_qprev, *lkb_qnext; /* on its resource queue */
    struct lt_lock *lkb_hnext;             /* id hash chain */
};

struct lt_queue {
    struct lt_lock *head, *tail;
};

struct lt_res {
    uint8_t *res_name;
    size_t res_namelen;
    uint64_t res_hash;
    struct lt_res *res_hnext;
    struct lt_queue res_grantq, res_convertq, res_waitq;
    uint8_t res_lvb[LVB_LEN];
    uint64_t res_lvbseq;
    int res_lvb_valid;
    int res_unordered; /* convert queue rebuilt by recovery: grant in any order */
    size_t res_nlocks;
    struct lt_res *res_tprev, *res_tnext; /* toss list, while it has no locks */
    int res_tossed;
    uint64_t res_toss_epoch;              /* the table's epoch when it went idle */
};

struct cfs_lt {
    struct lt_res **res_buckets;
    size_t nres_buckets, nres;
    struct lt_lock **lk_buckets;
    size_t nlk_buckets, nlocks;
    struct cfs_lt_event *ev;
    size_t ev_head, ev_len, ev_cap;
    unsigned mark;
    struct lt_res *toss_head, *toss_tail; /* idle resources, oldest first */
    size_t ntossed;
    uint64_t epoch;
};

static void toss_add(struct cfs_lt *t, struct lt_res *r);
static void toss_del(struct cfs_lt *t, struct lt_res *r);

/* -- hashing ---------------------------------------------------------------- */
static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

struct cfs_lt *cfs_lt_create(void)
{
    struct cfs_lt *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->nres_buckets = 64;
    t->nlk_buckets = 64;
    t->res_buckets = calloc(t->nres_buckets, sizeof(*t->res_buckets));
    t->lk_buckets = calloc(t->nlk_buckets, sizeof(*t->lk_buckets));
    if (!t->res_buckets || !t->lk_buckets) {
        free(t->res_buckets);
        free(t->lk_buckets);
        free(t);
        return NULL;
    }
    return t;
}

static void free_res(struct lt_res *r)
{
    struct lt_queue *qs[3] = {&r->res_grantq, &r->res_convertq, &r->res_waitq};
    for (int i = 0; i < 3; i++) {
        struct lt_lock *l = qs[i]->head;
        while (l) {
            struct lt_lock *n = l->lkb_qnext;
            free(l);
            l = n;
        }
    }
    free(r->res_name);
    free(r);
}

void cfs_lt_destroy(struct cfs_lt *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->nres_buckets; i++) {
        struct lt_res *r = t->res_buckets[i];
        while (r) {
            struct lt_res *n = r->res_hnext;
            free_res(r);
            r = n;
        }
    }
    free(t->res_buckets);
    free(t->lk_buckets);
    free(t->ev);
    free(t);
}

static struct lt_res *find_res(struct cfs_lt *t, const uint8_t *name, size_t len, uint64_t h)
{
    struct lt_res *r = t->res_buckets[h & (t->nres_buckets - 1)];
    for (; r; r = r->res_hnext)
        if (r->res_hash == h && r->res_namelen == len && memcmp(r->res_name, name, len) == 0)
            return r;
    return NULL;
}

static void grow_res(struct cfs_lt *t)
{
    size_t nb = t->nres_buckets * 2;
    struct lt_res **b = calloc(nb, sizeof(*b));
    if (!b)
        return; /* keep the old, longer chains */
    for (size_t i = 0; i < t->nres_buckets; i++) {
        struct lt_res *r = t->res_buckets[i];
        while (r) {
            struct lt_res *n = r->res_hnext;
            r->res_hnext = b[r->res_hash & (nb - 1)];
            b[r->res_hash & (nb - 1)] = r;
            r = n;
        }
    }
    free(t->res_buckets);
    t->res_buckets = b;
    t->nres_buckets = nb;
}

static struct lt_res *get_res(struct cfs_lt *t, const uint8_t *name, size_t len, int create)
{
    uint64_t h = fnv1a(name, len);
    struct lt_res *r = find_res(t, name, len, h);
    if (r || !create)
        return r;
    r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->res_name = malloc(len ? len : 1);
    if (!r->res_name) {
        free(r);
        return NULL;
    }
    memcpy(r->res_name, name, len);
    r->res_namelen = len;
    r->res_hash = h;
    r->res_lvb_valid = 1;
    if (t->nres >= t->nres_buckets)
        grow_res(t);
    r->res_hnext = t->res_buckets[h & (t->nres_buckets - 1)];
    t->res_buckets[h & (t->nres_buckets - 1)] = r;
    t->nres++;
    toss_add(t, r); /* no locks yet; the caller's new lock takes it off again */
    return r;
}

/* -- the toss list ------------------------------------------------------------ */
static void toss_add(struct cfs_lt *t, struct lt_res *r)
{
    if (r->res_tossed)
        return;
    r->res_tossed = 1;
    r->res_toss_epoch = t->epoch;
    r->res_tnext = NULL;
    r->res_tprev = t->toss_tail;
    if (t->toss_tail) t->toss_tail->res_tnext = r;
    else t->toss_head = r;
    t->toss_tail = r;
    t->ntossed++;
}

static void toss_del(struct cfs_lt *t, struct lt_res *r)
{
    if (!r->res_tossed)
        return;
    if (r->res_tprev) r->res_tprev->res_tnext = r->res_tnext;
    else t->toss_head = r->res_tnext;
    if (r->res_tnext) r->res_tnext->res_tprev = r->res_tprev;
    else t->toss_tail = r->res_tprev;
    r->res_tprev = r->res_tnext = NULL;
    r->res_tossed = 0;
    t->ntossed--;
}

void cfs_lt_set_epoch(struct cfs_lt *t, uint64_t epoch) { t->epoch = epoch; }

/* The oldest idle resource that went idle before `before`: its name length
 * (name copied up to max bytes), or 0 when there is none. It stays in the
 * table until the caller drops it (cfs_lt_drop_resource). */
long cfs_lt_idle_resource(struct cfs_lt *t, uint64_t before, uint8_t *name, size_t max)
{
    struct lt_res *r = t->toss_head;
    if (!r || r->res_toss_epoch >= before)
        return 0;
    memcpy(name, r->res_name, r->res_namelen < max ? r->res_namelen : max);
    return (long)r->res_namelen;
}

static struct lt_lock *find_lock(struct cfs_lt *t, uint64_t id)
{
    struct lt_lock *l = t->lk_buckets[mix64(id) & (t->nlk_buckets - 1)];
    for (; l; l = l->lkb_hnext)
        if (l->lkb_id == id)
            return l;
    return NULL;
}

static void grow_locks(struct cfs_lt *t)
{
    size_t nb = t->nlk_buckets * 2;
    struct lt_lock **b = calloc(nb, sizeof(*b));
    if (!b)
        return;
    for (size_t i = 0; i < t->nlk_buckets; i++) {
        struct lt_lock *l = t->lk_buckets[i];
        while (l) {
            struct lt_lock *n = l->lkb_hnext;
            size_t k = mix64(l->lkb_id) & (nb - 1);
            l->lkb_hnext = b[k];
            b[k] = l;
            l = n;
        }
    }
    free(t->lk_buckets);
    t->lk_buckets = b;
    t->nlk_buckets = nb;
}

static void hash_lock(struct cfs_lt *t, struct lt_lock *l)
{
    if (t->nlocks >= t->nlk_buckets)
        grow_locks(t);
    size_t k = mix64(l->lkb_id) & (t->nlk_buckets - 1);
    l->lkb_hnext = t->lk_buckets[k];
    t->lk_buckets[k] = l;
    t->nlocks++;
}

static void unhash_lock(struct cfs_lt *t, struct lt_lock *l)
{
    struct lt_lock **pp = &t->lk_buckets[mix64(l->lkb_id) & (t->nlk_buckets - 1)];
    for (; *pp; pp = &(*pp)->lkb_hnext)
        if (*pp == l) {
            *pp = l->lkb_hnext;
            t->nlocks--;
            return;
        }
}

/* -- queues ------------------------------------------------------------------- */
static struct lt_queue *queue_of(struct lt_res *r, int q)
{
    switch (q) {
    case Q_GRANT: return &r->res_grantq;
    case Q_CONVERT: return &r->res_convertq;
    case Q_WAIT: return &r->res_waitq;
    default: return NULL;
    }
}

static void q_del(struct lt_lock *l)
{
    struct lt_queue *q = queue_of(l->lkb_res, l->lkb_queue);
    if (!q)
        return;
    if (l->lkb_qprev) l->lkb_qprev->lkb_qnext = l->lkb_qnext;
    else q->head = l->lkb_qnext;
    if (l->lkb_qnext) l->lkb_qnext->lkb_qprev = l->lkb_qprev;
    else q->tail = l->lkb_qprev;
    l->lkb_qprev = l->lkb_qnext = NULL;
    l->lkb_queue = Q_NONE;
}

static void q_add(struct lt_lock *l, int qn)
{
    struct lt_queue *q = queue_of(l->lkb_res, qn);
    l->lkb_qnext = NULL;
    l->lkb_qprev = q->tail;
    if (q->tail) q->tail->lkb_qnext = l;
    else q->head = l;
    q->tail = l;
    l->lkb_queue = qn;
}

/* -- events ------------------------------------------------------------------- */
static int push_event(struct cfs_lt *t, int type, uint64_t lkid, int mode)
{
    if (t->ev_len == t->ev_cap) {
        size_t ncap = t->ev_cap ? t->ev_cap * 2 : 64;
        struct cfs_lt_event *n = malloc(ncap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        for (size_t i = 0; i < t->ev_len; i++)
            n[i] = t->ev[(t->ev_head + i) % t->ev_cap];
        free(t->ev);
        t->ev = n;
        t->ev_cap = ncap;
        t->ev_head = 0;
    }
    struct cfs_lt_event *e = &t->ev[(t->ev_head + t->ev_len) % t->ev_cap];
    e->type = type;
    e->lkid = lkid;
    e->mode = mode;
    t->ev_len++;
    return 0;
}

int cfs_lt_next_event(struct cfs_lt *t, struct cfs_lt_event *ev)
{
    if (!t->ev_len)
        return 0;
    *ev = t->ev[t->ev_head];
    t->ev_head = (t->ev_head + 1) % t->ev_cap;
    t->ev_len--;
    return 1;
}

/* -- compatibility ------------------------------------------------------------ */
static int overlap(const struct lt_lock *a, const struct lt_lock *b)
{
    return a->lkb_start <= b->lkb_end && b->lkb_start <= a->lkb_end;
}

static int clash(int mode_a, const struct lt_lock *a, int mode_b, const struct lt_lock *b)
{
    if (mode_a < 0 || mode_b < 0)
        return 0;
    return overlap(a, b) && !compat[mode_a][mode_b];
}

/* Is l (converting or waiting, wanting lkb_rqmode) blocked by holder h? */
static int blocked_by_holder(const struct lt_lock *l, const struct lt_lock *h)
{
    return h != l && clash(l->lkb_rqmode, l, h->lkb_grmode, h);
}

static int holders_allow(struct lt_res *r, struct lt_lock *l)
{
    struct lt_lock *h;
    for (h = r->res_grantq.head; h; h = h->lkb_qnext)
        if (blocked_by_holder(l, h))
            return 0;
    for (h = r->res_convertq.head; h; h = h->lkb_qnext)
        if (blocked_by_holder(l, h))
            return 0;
    return 1;
}

/* Convert-queue order: is queued conversion l behind older conversion o?
 * Only when their wanted modes clash (range-aware, like waiters), and never
 * while the queue is the unordered one recovery rebuilt. */
static int behind_older_conversion(const struct lt_res *r, const struct lt_lock *l,
                                   const struct lt_lock *o)
{
    return !r->res_unordered && clash(l->lkb_rqmode, l, o->lkb_rqmode, o);
}

/* A queued conversion: every holder allows it and no older conversion it is
 * behind is still queued (so converters are served first come, first served). */
static int can_grant_queued_convert(struct lt_res *r, struct lt_lock *l)
{
    if (!holders_allow(r, l))
        return 0;
    for (struct lt_lock *o = r->res_convertq.head; o && o != l; o = o->lkb_qnext)
        if (behind_older_conversion(r, l, o))
            return 0;
    return 1;
}

/* A new request: holders, every wanted conversion, and every older waiter. */
static int can_grant_request(struct lt_res *r, struct lt_lock *l)
{
    struct lt_lock *o;
    if (!holders_allow(r, l))
        return 0;
    for (o = r->res_convertq.head; o; o = o->lkb_qnext)
        if (clash(l->lkb_rqmode, l, o->lkb_rqmode, o))
            return 0;
    for (o = r->res_waitq.head; o && o != l; o = o->lkb_qnext)
        if (clash(l->lkb_rqmode, l, o->lkb_rqmode, o))
            return 0;
    return 1;
}

/* Does queued conversion `from` wait for conversion h: on h's granted mode,
 * or behind h in the convert queue (h older, wanted modes clashing)? */
static int conversion_waits_for(const struct lt_res *r, const struct lt_lock *from,
                                const struct lt_lock *h)
{
    if (blocked_by_holder(from, h))
        return 1;
    for (const struct lt_lock *o = r->res_convertq.head; o && o != from; o = o->lkb_qnext)
        if (o == h)
            return behind_older_conversion(r, from, h);
    return 0;
}

/* Conversion deadlock: following "waits for" edges between queued
 * conversions from `from`, do we come back to `target`? Only conversions can
 * be part of a cycle: a plain holder never waits, and a waiter never blocks a
 * holder. With the queue in order this includes the Linux DLM's case of a
 * conversion whose granted mode blocks an older conversion it queues behind. */
static int conv_cycle(struct cfs_lt *t, struct lt_res *r, struct lt_lock *from,
                      struct lt_lock *target, int depth)
{
    struct lt_lock *h;
    if (depth > 64)
        return 0;
    from->lkb_mark = t->mark;
    for (h = r->res_convertq.head; h; h = h->lkb_qnext) {
        if (h == from || !conversion_waits_for(r, from, h))
            continue;
        if (h == target)
            return 1;
        if (h->lkb_mark != t->mark && conv_cycle(t, r, h, target, depth + 1))
            return 1;
    }
    return 0;
}

static void grant_lock(struct cfs_lt *t, struct lt_lock *l)
{
    q_del(l);
    l->lkb_grmode = l->lkb_rqmode;
    l->lkb_rqmode = -1;
    l->lkb_highbast = -1;
    q_add(l, Q_GRANT);
    push_event(t, EV_GRANT, l->lkb_id, l->lkb_grmode);
}

static void send_basts(struct cfs_lt *t, struct lt_res *r)
{
    struct lt_queue *waiting[2] = {&r->res_convertq, &r->res_waitq};
    struct lt_queue *holding[2] = {&r->res_grantq, &r->res_convertq};
    for (int i = 0; i < 2; i++)
        for (struct lt_lock *w = waiting[i]->head; w; w = w->lkb_qnext)
            for (int j = 0; j < 2; j++)
                for (struct lt_lock *h = holding[j]->head; h; h = h->lkb_qnext)
                    if (blocked_by_holder(w, h) && h->lkb_highbast < w->lkb_rqmode) {
                        h->lkb_highbast = w->lkb_rqmode;
                        push_event(t, EV_BAST, h->lkb_id, w->lkb_rqmode);
                    }
}

/* Grant what can be granted: conversions first, in queue order (the first
 * grantable one, then look again from the head: a grant may unblock an older
 * one), then new requests in FIFO order; then tell the holders that still
 * block someone. */
static int grant_pending(struct cfs_lt *t, struct lt_res *r)
{
    int granted = 0, moved;
    do {
        moved = 0;
        for (struct lt_lock *l = r->res_convertq.head; l; l = l->lkb_qnext)
            if (can_grant_queued_convert(r, l)) {
                grant_lock(t, l);
                granted++;
                moved = 1;
                break;
            }
    } while (moved);
    if (!r->res_convertq.head)
        r->res_unordered = 0; /* recovery's queue has drained: order again */
    struct lt_lock *l = r->res_waitq.head;
    while (l) {
        struct lt_lock *n = l->lkb_qnext;
        if (can_grant_request(r, l)) {
            grant_lock(t, l);
            granted++;
        }
        l = n;
    }
    send_basts(t, r);
    return granted;
}

static void free_lock(struct cfs_lt *t, struct lt_lock *l)
{
    struct lt_res *r = l->lkb_res;
    q_del(l);
    unhash_lock(t, l);
    if (--r->res_nlocks == 0)
        toss_add(t, r);
    free(l);
}

static void store_lvb(struct lt_res *r, const uint8_t *lvb)
{
    memcpy(r->res_lvb, lvb, LVB_LEN);
    r->res_lvbseq++;
    r->res_lvb_valid = 1;
}

/* -- operations ---------------------------------------------------------------- */
static int valid_mode(int m) { return m >= 0 && m < NMODES; }

static struct lt_lock *new_lock(struct cfs_lt *t, struct lt_res *r, uint64_t lkid,
                                uint32_t nodeid, uint64_t start, uint64_t end)
{
    struct lt_lock *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    l->lkb_id = lkid;
    l->lkb_nodeid = nodeid;
    l->lkb_grmode = -1;
    l->lkb_rqmode = -1;
    l->lkb_highbast = -1;
    l->lkb_start = start;
    l->lkb_end = end;
    l->lkb_res = r;
    if (r->res_nlocks++ == 0)
        toss_del(t, r);
    hash_lock(t, l);
    return l;
}

/* A new lock on resource `name` (created if need be): -EEXIST for a lock id
 * already in the table, -ENOMEM when memory runs out. Queues are the caller's. */
static int insert_lock(struct cfs_lt *t, const uint8_t *name, size_t namelen, uint64_t lkid,
                       uint32_t nodeid, uint64_t start, uint64_t end, struct lt_lock **out)
{
    if (find_lock(t, lkid))
        return -EEXIST;
    struct lt_res *r = get_res(t, name, namelen, 1);
    if (!r)
        return -ENOMEM;
    *out = new_lock(t, r, lkid, nodeid, start, end);
    return *out ? 0 : -ENOMEM;
}

int cfs_lt_request(struct cfs_lt *t, const uint8_t *name, size_t namelen, uint64_t lkid,
                   uint32_t nodeid, int mode, uint64_t start, uint64_t end, int flags)
{
    if (!valid_mode(mode) || start > end)
        return -EINVAL;
    struct lt_lock *l;
    int rc = insert_lock(t, name, namelen, lkid, nodeid, start, end, &l);
    if (rc)
        return rc;
    struct lt_res *r = l->lkb_res;
    l->lkb_rqmode = mode;
    if (can_grant_request(r, l)) {
        l->lkb_grmode = mode;
        l->lkb_rqmode = -1;
        q_add(l, Q_GRANT);
        return 1;
    }
    if (flags & F_TRY) {
        free_lock(t, l);
        return -EAGAIN;
    }
    q_add(l, Q_WAIT);
    send_basts(t, r);
    return 0;
}

int cfs_lt_convert(struct cfs_lt *t, uint64_t lkid, int mode, int flags, const uint8_t *lvb)
{
    struct lt_lock *l = find_lock(t, lkid);
    if (!l)
        return -ENOENT;
    if (!valid_mode(mode))
        return -EINVAL;
    if (l->lkb_queue != Q_GRANT)
        return -EBUSY;
    struct lt_res *r = l->lkb_res;
    if (lvb && l->lkb_grmode >= 4 && mode < 4)
        store_lvb(r, lvb);
    l->lkb_rqmode = mode;
    /* Granted in place when every holder allows it, even past queued
     * conversions (Linux without DLM_LKF_QUECVT): a down-conversion must never
     * wait, and no queued conversion is blocked by what it now holds more. */
    if (holders_allow(r, l)) {
        l->lkb_grmode = mode;
        l->lkb_rqmode = -1;
        l->lkb_highbast = -1;
        grant_pending(t, r); /* a down-conversion may free others */
        return 1;
    }
    if (flags & F_TRY) {
        l->lkb_rqmode = -1;
        return -EAGAIN;
    }
    q_del(l);
    q_add(l, Q_CONVERT);
    t->mark++;
    if (conv_cycle(t, r, l, l, 0)) {
        q_del(l);
        l->lkb_rqmode = -1;
        q_add(l, Q_GRANT);
        return -EDEADLK;
    }
    grant_pending(t, r); /* waiters may now be blocked by the wanted mode: basts */
    return 0;
}

int cfs_lt_unlock(struct cfs_lt *t, uint64_t lkid, const uint8_t *lvb)
{
    struct lt_lock *l = find_lock(t, lkid);
    if (!l)
        return -ENOENT;
    if (l->lkb_queue != Q_GRANT)
        return -EBUSY;
    struct lt_res *r = l->lkb_res;
    if (lvb && l->lkb_grmode >= 4)
        store_lvb(r, lvb);
    free_lock(t, l);
    grant_pending(t, r);
    return 0;
}

int cfs_lt_cancel(struct cfs_lt *t, uint64_t lkid)
{
    struct lt_lock *l = find_lock(t, lkid);
    if (!l)
        return -ENOENT;
    struct lt_res *r = l->lkb_res;
    if (l->lkb_queue == Q_WAIT) {
        free_lock(t, l);
    } else if (l->lkb_queue == Q_CONVERT) {
        q_del(l);
        l->lkb_rqmode = -1;
        q_add(l, Q_GRANT);
    } else {
        return 0;
    }
    grant_pending(t, r);
    return 1;
}

int cfs_lt_lock_lvb(struct cfs_lt *t, uint64_t lkid, uint8_t *out, uint64_t *seq)
{
    struct lt_lock *l = find_lock(t, lkid);
    if (!l)
        return -ENOENT;
    memcpy(out, l->lkb_res->res_lvb, LVB_LEN);
    *seq = l->lkb_res->res_lvbseq;
    return l->lkb_res->res_lvb_valid;
}

int cfs_lt_res_lvb(struct cfs_lt *t, const uint8_t *name, size_t namelen, uint8_t *out,
                   uint64_t *seq)
{
    struct lt_res *r = get_res(t, name, namelen, 0);
    if (!r)
        return -ENOENT;
    memcpy(out, r->res_lvb, LVB_LEN);
    *seq = r->res_lvbseq;
    return r->res_lvb_valid;
}

int cfs_lt_set_res_lvb(struct cfs_lt *t, const uint8_t *name, size_t namelen,
                       const uint8_t *lvb, uint64_t seq, int valid)
{
    struct lt_res *r = get_res(t, name, namelen, 1);
    if (!r)
        return -ENOMEM;
    memcpy(r->res_lvb, lvb, LVB_LEN);
    r->res_lvbseq = seq;
    r->res_lvb_valid = !!valid;
    return 0;
}

/* Rebuild: put a lock back in the state its owner reports (DLM_RECOVER_LOCKS).
 * No grants, no events: the caller runs cfs_lt_regrant() when all are in. */
int cfs_lt_recover_lock(struct cfs_lt *t, const uint8_t *name, size_t namelen, uint64_t lkid,
                        uint32_t nodeid, int grmode, int rqmode, uint64_t start, uint64_t end)
{
    if ((grmode < 0 && !valid_mode(rqmode)) || (grmode >= 0 && !valid_mode(grmode)) ||
        (rqmode >= 0 && !valid_mode(rqmode)) || start > end)
        return -EINVAL;
    struct lt_lock *l;
    int rc = insert_lock(t, name, namelen, lkid, nodeid, start, end, &l);
    if (rc)
        return rc;
    l->lkb_grmode = grmode;
    l->lkb_rqmode = rqmode;
    q_add(l, grmode < 0 ? Q_WAIT : (rqmode < 0 ? Q_GRANT : Q_CONVERT));
    if (l->lkb_queue == Q_CONVERT)
        /* Owners re-send in their own order, so the old queue order is lost
         * and keeping this one could create a deadlock of order (NL->EX
         * ahead of PR->EX); grant in any order until the queue drains. */
        l->lkb_res->res_unordered = 1;
    return 0;
}

/* A rebuilt convert queue may hold a conversion deadlock that no convert call
 * ever saw: two owners converting PR->EX, each re-sent by recovery as it stood
 * (one of them a conversion its master had not yet received, or had dropped
 * in a resync). A convert call would have refused the second with -EDEADLK;
 * do the same now, to the newest in queue order (as the Linux DLM's
 * grant_pending_convert does with conversion_deadlock_detect): it goes back
 * to its granted mode and its owner is told (EV_DEADLOCK). */
static int refuse_deadlocked_conversions(struct cfs_lt *t, struct lt_res *r)
{
    int refused = 0;
    for (;;) {
        struct lt_lock *victim = NULL;
        for (struct lt_lock *l = r->res_convertq.head; l; l = l->lkb_qnext) {
            t->mark++;
            if (conv_cycle(t, r, l, l, 0))
                victim = l;
        }
        if (!victim)
            return refused;
        q_del(victim);
        victim->lkb_rqmode = -1;
        q_add(victim, Q_GRANT);
        push_event(t, EV_DEADLOCK, victim->lkb_id, victim->lkb_grmode);
        refused++;
    }
}

int cfs_lt_regrant(struct cfs_lt *t, const uint8_t *name, size_t namelen)
{
    struct lt_res *r = get_res(t, name, namelen, 0);
    if (!r)
        return -ENOENT;
    /* (first: a cycle only ends when one of its conversions does, and the
     * holders the survivors must be told about are those left after it) */
    refuse_deadlocked_conversions(t, r);
    return grant_pending(t, r);
}

/* Drop every lock of a dead node; a resource it held in PW/EX loses its LVB
 * (marked not valid: the writer may have changed what the LVB describes). */
int cfs_lt_purge_node(struct cfs_lt *t, uint32_t nodeid)
{
    int n = 0;
    for (size_t i = 0; i < t->nres_buckets; i++)
        for (struct lt_res *r = t->res_buckets[i]; r; r = r->res_hnext) {
            struct lt_queue *qs[3] = {&r->res_grantq, &r->res_convertq, &r->res_waitq};
            for (int j = 0; j < 3; j++) {
                struct lt_lock *l = qs[j]->head;
                while (l) {
                    struct lt_lock *nx = l->lkb_qnext;
                    if (l->lkb_nodeid == nodeid) {
                        if (l->lkb_grmode >= 4)
                            r->res_lvb_valid = 0;
                        free_lock(t, l);
                        n++;
                    }
                    l = nx;
                }
            }
        }
    return n;
}

int cfs_lt_drop_resource(struct cfs_lt *t, const uint8_t *name, size_t namelen)
{
    uint64_t h = fnv1a(name, namelen);
    struct lt_res **pp = &t->res_buckets[h & (t->nres_buckets - 1)];
    for (; *pp; pp = &(*pp)->res_hnext) {
        struct lt_res *r = *pp;
        if (r->res_hash == h && r->res_namelen == namelen &&
            memcmp(r->res_name, name, namelen) == 0) {
            *pp = r->res_hnext;
            toss_del(t, r);
            struct lt_queue *qs[3] = {&r->res_grantq, &r->res_convertq, &r->res_waitq};
            for (int j = 0; j < 3; j++)
                for (struct lt_lock *l = qs[j]->head; l; l = l->lkb_qnext)
                    unhash_lock(t, l);
            free_res(r);
            t->nres--;
            return 0;
        }
    }
    return -ENOENT;
}

static void fill_info(const struct lt_lock *l, struct cfs_lt_info *o)
{
    o->lkid = l->lkb_id;
    o->nodeid = l->lkb_nodeid;
    o->grmode = l->lkb_grmode;
    o->rqmode = l->lkb_rqmode;
    o->queue = l->lkb_queue;
    o->start = l->lkb_start;
    o->end = l->lkb_end;
}

int cfs_lt_dump(struct cfs_lt *t, const uint8_t *name, size_t namelen,
                struct cfs_lt_info *out, int max)
{
    struct lt_res *r = get_res(t, name, namelen, 0);
    if (!r)
        return -ENOENT;
    int n = 0;
    struct lt_queue *qs[3] = {&r->res_grantq, &r->res_convertq, &r->res_waitq};
    for (int j = 0; j < 3; j++)
        for (struct lt_lock *l = qs[j]->head; l; l = l->lkb_qnext) {
            if (n < max)
                fill_info(l, &out[n]);
            n++;
        }
    return n;
}

int cfs_lt_lock_info(struct cfs_lt *t, uint64_t lkid, struct cfs_lt_info *out)
{
    struct lt_lock *l = find_lock(t, lkid);
    if (!l)
        return -ENOENT;
    fill_info(l, out);
    return 0;
}

size_t cfs_lt_nres(struct cfs_lt *t) { return t->nres; }
size_t cfs_lt_nlocks(struct cfs_lt *t) { return t->nlocks; }
size_t cfs_lt_nidle(struct cfs_lt *t) { return t->ntossed; }
