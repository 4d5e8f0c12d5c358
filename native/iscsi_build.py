"""cffi builder for clusterfs._iscsi: the few libiscsi calls IscsiDevice makes
(block I/O, and the persistent-reservation commands the SCSI-3 PR fencing agent uses).

A module of its own, linked with -liscsi, so that a machine without libiscsi still
builds clusterfs._native (setup.py leaves this one out when pkg-config cannot find
libiscsi). Only the synchronous API is used; clusterfs/storage/iscsi.py wraps it.
Struct layouts are left to the compiler ("...;"): only the fields read are named.
"""
from cffi import FFI

CDEF = """
struct iscsi_context;

struct iscsi_url {
    char portal[...];
    char target[...];
    int lun;
    ...;
};

enum iscsi_session_type { ISCSI_SESSION_NORMAL, ... };
enum iscsi_header_digest { ISCSI_HEADER_DIGEST_NONE_CRC32C, ... };

enum scsi_status {
    SCSI_STATUS_GOOD, SCSI_STATUS_CHECK_CONDITION, SCSI_STATUS_RESERVATION_CONFLICT,
    SCSI_STATUS_CANCELLED, SCSI_STATUS_ERROR, SCSI_STATUS_TIMEOUT, ...
};

enum scsi_sense_key {
    SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_UNIT_ATTENTION, ...
};

struct scsi_sense {
    unsigned char error_type;
    enum scsi_sense_key key;
    int ascq;
    ...;
};

/* persistent reservations (SPC-3): PERSISTENT RESERVE IN / OUT */
enum scsi_persistent_in_sa {
    SCSI_PERSISTENT_RESERVE_READ_KEYS, SCSI_PERSISTENT_RESERVE_READ_RESERVATION, ...
};
enum scsi_persistent_out_sa {
    SCSI_PERSISTENT_RESERVE_REGISTER, SCSI_PERSISTENT_RESERVE_RESERVE,
    SCSI_PERSISTENT_RESERVE_PREEMPT, SCSI_PERSISTENT_RESERVE_PREEMPT_AND_ABORT,
    SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY, ...
};
enum scsi_persistent_out_scope { SCSI_PERSISTENT_RESERVE_SCOPE_LU, ... };
enum scsi_persistent_out_type {
    SCSI_PERSISTENT_RESERVE_TYPE_WRITE_EXCLUSIVE_REGISTRANTS_ONLY, ...
};
struct scsi_persistent_reserve_out_basic {
    uint64_t reservation_key;
    uint64_t service_action_reservation_key;
    uint8_t spec_i_pt;
    uint8_t all_tg_pt;
    uint8_t aptpl;
    ...;
};

struct scsi_data {
    int size;
    unsigned char *data;
};

struct scsi_task {
    int status;
    struct scsi_sense sense;
    struct scsi_data datain;
    ...;
};

struct scsi_readcapacity16 {
    uint64_t returned_lba;
    uint32_t block_length;
    ...;
};

struct iscsi_context *iscsi_create_context(const char *initiator_name);
int iscsi_destroy_context(struct iscsi_context *iscsi);
const char *iscsi_get_error(struct iscsi_context *iscsi);

struct iscsi_url *iscsi_parse_full_url(struct iscsi_context *iscsi, const char *url);
void iscsi_destroy_url(struct iscsi_url *iscsi_url);

int iscsi_set_targetname(struct iscsi_context *iscsi, const char *targetname);
int iscsi_set_session_type(struct iscsi_context *iscsi, enum iscsi_session_type session_type);
int iscsi_set_header_digest(struct iscsi_context *iscsi, enum iscsi_header_digest header_digest);
int iscsi_set_timeout(struct iscsi_context *iscsi, int timeout);
void iscsi_set_noautoreconnect(struct iscsi_context *iscsi, int state);
int iscsi_set_isid_random(struct iscsi_context *iscsi, uint32_t rnd, uint32_t qualifier);
int iscsi_get_fd(struct iscsi_context *iscsi);

int iscsi_full_connect_sync(struct iscsi_context *iscsi, const char *portal, int lun);
int iscsi_logout_sync(struct iscsi_context *iscsi);

struct scsi_task *iscsi_readcapacity16_sync(struct iscsi_context *iscsi, int lun);
struct scsi_task *iscsi_read16_sync(struct iscsi_context *iscsi, int lun, uint64_t lba,
    uint32_t datalen, int blocksize, int rdprotect, int dpo, int fua, int fua_nv,
    int group_number);
struct scsi_task *iscsi_write16_sync(struct iscsi_context *iscsi, int lun, uint64_t lba,
    unsigned char *data, uint32_t datalen, int blocksize, int wrprotect, int dpo, int fua,
    int fua_nv, int group_number);
struct scsi_task *iscsi_synchronizecache16_sync(struct iscsi_context *iscsi, int lun,
    uint64_t lba, uint32_t num_blocks, int syncnv, int immed);

struct scsi_task *iscsi_persistent_reserve_in_sync(struct iscsi_context *iscsi, int lun,
    int sa, uint16_t xferlen);
struct scsi_task *iscsi_persistent_reserve_out_sync(struct iscsi_context *iscsi, int lun,
    int sa, int scope, int type, void *params);

void *scsi_datain_unmarshall(struct scsi_task *task);
void scsi_free_scsi_task(struct scsi_task *task);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "clusterfs._iscsi",
    "#include <stdint.h>\n#include <iscsi/iscsi.h>\n#include <iscsi/scsi-lowlevel.h>\n",
    libraries=["iscsi"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
