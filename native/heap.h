int cfs_heap_hold(size_t headroom);
int cfs_heap_top_up(size_t headroom);
void cfs_heap_stats(uint64_t *out);
int cfs_arenas_reserve(size_t count, size_t slot);
int cfs_arenas_top_up(void);
void cfs_arenas_failover(int on);
void cfs_arenas_stats(uint64_t *out);
