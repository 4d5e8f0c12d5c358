struct cfs_uring;
struct cfs_uring *cfs_uring_open(unsigned entries, int eventfd, int *err);
void cfs_uring_close(struct cfs_uring *ring);
int cfs_uring_queue_fsync(struct cfs_uring *ring, int fd, int link, uint64_t tag);
int cfs_uring_queue_write(struct cfs_uring *ring, int fd, const void *buf, uint32_t len,
                          uint64_t offset, int link, uint64_t tag);
int cfs_uring_queue_read(struct cfs_uring *ring, int fd, void *buf, uint32_t len,
                         uint64_t offset, uint64_t tag);
int cfs_uring_submit(struct cfs_uring *ring);
int cfs_uring_wait(struct cfs_uring *ring, unsigned count);
int cfs_uring_reap(struct cfs_uring *ring, uint64_t *tags, int32_t *results, int max);
