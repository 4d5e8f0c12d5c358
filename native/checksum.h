uint32_t cfs_crc32c(uint32_t crc, const uint8_t *buf, size_t len);
int cfs_crc32c_hw(void);
