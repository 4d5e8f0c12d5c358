struct cfs_lt;
struct cfs_lt_event {
    int type;
    uint64_t lkid;
    int mode;
};
struct cfs_lt_info {
    uint64_t lkid;
    uint32_t nodeid;
    int grmode;
    int rqmode;
    int queue;
    uint64_t start;
    uint64_t end;
};
struct cfs_lt *cfs_lt_create(void);
void cfs_lt_destroy(struct cfs_lt *t);
int cfs_lt_request(struct cfs_lt *t, const uint8_t *name, size_t namelen, uint64_t lkid,
                   uint32_t nodeid, int mode, uint64_t start, uint64_t end, int flags);
int cfs_lt_convert(struct cfs_lt *t, uint64_t lkid, int mode, int flags, const uint8_t *lvb);
int cfs_lt_unlock(struct cfs_lt *t, uint64_t lkid, const uint8_t *lvb);
int cfs_lt_cancel(struct cfs_lt *t, uint64_t lkid);
int cfs_lt_next_event(struct cfs_lt *t, struct cfs_lt_event *ev);
int cfs_lt_lock_lvb(struct cfs_lt *t, uint64_t lkid, uint8_t *out, uint64_t *seq);
int cfs_lt_res_lvb(struct cfs_lt *t, const uint8_t *name, size_t namelen, uint8_t *out,
                   uint64_t *seq);
int cfs_lt_set_res_lvb(struct cfs_lt *t, const uint8_t *name, size_t namelen,
                       const uint8_t *lvb, uint64_t seq, int valid);
int cfs_lt_recover_lock(struct cfs_lt *t, const uint8_t *name, size_t namelen, uint64_t lkid,
                        uint32_t nodeid, int grmode, int rqmode, uint64_t start, uint64_t end);
int cfs_lt_regrant(struct cfs_lt *t, const uint8_t *name, size_t namelen);
int cfs_lt_purge_node(struct cfs_lt *t, uint32_t nodeid);
int cfs_lt_drop_resource(struct cfs_lt *t, const uint8_t *name, size_t namelen);
int cfs_lt_dump(struct cfs_lt *t, const uint8_t *name, size_t namelen,
                struct cfs_lt_info *out, int max);
int cfs_lt_lock_info(struct cfs_lt *t, uint64_t lkid, struct cfs_lt_info *out);
size_t cfs_lt_nres(struct cfs_lt *t);
size_t cfs_lt_nlocks(struct cfs_lt *t);
size_t cfs_lt_nidle(struct cfs_lt *t);
void cfs_lt_set_epoch(struct cfs_lt *t, uint64_t epoch);
long cfs_lt_idle_resource(struct cfs_lt *t, uint64_t before, uint8_t *name, size_t max);
