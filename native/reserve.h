int cfs_mlockall(void);
int cfs_set_io_flusher(void);
struct cfs_pool;
struct cfs_pool *cfs_pool_create(size_t nbufs, size_t bufsize);
void cfs_pool_destroy(struct cfs_pool *pool);
uint8_t *cfs_pool_get(struct cfs_pool *pool);
int cfs_pool_put(struct cfs_pool *pool, uint8_t *buf);
size_t cfs_pool_free_count(struct cfs_pool *pool);
size_t cfs_pool_bufsize(struct cfs_pool *pool);
