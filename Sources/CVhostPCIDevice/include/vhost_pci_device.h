/*
 * vhost_pci_device.h - libvhost-pci-device: VM2's virtio-net device for a
 * vhost-pci bridge (vhost-pci-bridged), for C data planes.
 *
 * VM2 implements the virtio-net device VM1's driver talks to: it reads the
 * frames VM1 transmits and writes frames into VM1's receive buffers, in
 * place, in VM1's memory, through the bridge's BAR window. This library
 * speaks the bridge's peer protocol (docs/peer-protocol.md), maps what VM1
 * grants, drops what VM1 revokes, and serves VM1's split virtqueues with
 * every access checked against the live grants: no call of this API reads
 * or writes memory outside a live grant.
 *
 * Threads: a device is used by one thread at a time (calls on one device
 * must not overlap; different devices are independent). The library starts
 * no thread. Callbacks run on the calling thread, inside vpd_poll,
 * vpd_receive_burst or vpd_transmit_burst, and must not call back into the
 * same device (those calls return VPD_EBUSY) — except vpd_close, which then
 * takes effect when the running call returns (it returns VPD_ECLOSED, and
 * dev is gone).
 *
 * Revocation: VM1 may take memory back at any time. The library applies a
 * revocation at the start of every call on the device, before anything
 * else, and acknowledges it to the bridge. The bridge waits for that, and
 * for the answer to a ring stop, at most its revocation deadline
 * (revocation-deadline-ms, 100 ms by default) and disconnects, or kills, a
 * VM2 that does not answer. Ring stops, new grants and logging changes come
 * on the socket, which only vpd_poll reads: call vpd_poll between bursts,
 * and sleep only in vpd_poll (it tells the bridge, which wakes it). Frame
 * pointers given to a vpd_frame_fn are valid only until that callback
 * returns. In iommu mode a burst may wait for the bridge to translate a
 * buffer VM1 has not granted yet (an IOTLB miss); revocations are still
 * answered meanwhile.
 *
 * Errors: functions return VPD_OK (0) or a negative VPD_E* code;
 * vpd_strerror names it, vpd_device_error says what happened. Nothing
 * else crosses the boundary (no exceptions, no language runtime types).
 * Signals: with unsealed VM1 memory the library installs a SIGBUS handler
 * (a VM1 that truncates its memory must not kill VM2); it passes signals
 * that are not its own to the handler that was there before.
 *
 * Link: pkg-config --cflags --libs vhost-pci-device
 */
#ifndef VHOST_PCI_DEVICE_H
#define VHOST_PCI_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI this header describes; vpd_abi_version() is the library's. A
 * library with a different major ABI is not compatible. */
#define VPD_ABI_VERSION 1

/* Return codes (negative). */
#define VPD_OK          0
#define VPD_EINVAL     -1  /* an argument is out of range (NULL, size, queue) */
#define VPD_ECONNECT   -2  /* the peer socket could not be reached */
#define VPD_EREFUSED   -3  /* the bridge refused this VM2 (busy, features) */
#define VPD_ETIMEDOUT  -4  /* no answer from the bridge in time */
#define VPD_ECLOSED    -5  /* the connection is over (the bridge closed it) */
#define VPD_EBUSY      -6  /* a call on this device from inside its callback */
#define VPD_EFAULT     -7  /* the range is not granted (never was, or revoked) */
#define VPD_ENOMEM     -8  /* out of memory */

/* The longest frame (Ethernet header on) a vpd_frame_fn is given; a
 * longer chain is given back to VM1 unseen and counted in frames_dropped. */
#define VPD_FRAME_MAX 65550u

/* virtio-net feature bits a device may serve (vpd_config.device_features). */
#define VPD_NET_F_MRG_RXBUF  (1ULL << 15)
#define VPD_NET_F_MQ         (1ULL << 22)
#define VPD_RING_F_EVENT_IDX (1ULL << 29)
#define VPD_F_VERSION_1      (1ULL << 32)

/* A piece of a frame, in VM1's memory (read only). */
struct vpd_segment {
    const uint8_t *base;
    uint32_t len;
};

/* A frame VM1 transmitted, Ethernet header first (the virtio-net header is
 * not included). Valid only during the vpd_frame_fn call that sees it. */
struct vpd_frame {
    uint32_t queue_pair;      /* VM1's transmit queue 2k+1 is queue pair k */
    uint32_t length;          /* bytes, over all segments */
    uint32_t segment_count;
    const struct vpd_segment *segments;
};

/* A frame to write into VM1's receive buffers, Ethernet header first. */
struct vpd_buffer {
    const void *data;
    uint32_t len;
};

/* What the application hears of the device's life; any may be NULL. */
struct vpd_callbacks {
    /* VM1 started the device with these negotiated features. */
    void (*device_started)(void *ctx, uint64_t features);
    /* VM1 stopped or reset the device (every ring stopped before this). */
    void (*device_stopped)(void *ctx);
    /* Queue `queue` runs / stopped (2k: VM1's receive queue k, 2k+1: its
     * transmit queue k). */
    void (*ring_started)(void *ctx, uint32_t queue);
    void (*ring_stopped)(void *ctx, uint32_t queue);
    /* VM1 took [bar_offset, bar_offset + length) back. The library already
     * refuses it; this is for the application's own bookkeeping (e.g. drop
     * copies of addresses it kept). */
    void (*revoked)(void *ctx, uint64_t bar_offset, uint64_t length);
};

struct vpd_config {
    /* sizeof(struct vpd_config): lets later versions grow it. */
    uint32_t size;
    /* Chains per queue per burst (0: 64). */
    uint32_t burst;
    /* virtio-net features this device serves (0: all the library serves:
     * VERSION_1, EVENT_IDX, MRG_RXBUF, MQ). VM1 cannot negotiate more. */
    uint64_t device_features;
    /* Non-zero: do not offer dirty-page logging (VM1 cannot live-migrate
     * while this device is attached). */
    uint32_t no_dirty_log;
    /* Milliseconds to wait for the bridge's HELLO reply (0: 5000). */
    uint32_t connect_timeout_ms;
    const struct vpd_callbacks *callbacks;
    void *ctx;
};

struct vpd_stats {
    uint64_t frames_received;   /* frames VM1 transmitted, seen by the device */
    uint64_t bytes_received;
    uint64_t frames_sent;       /* frames written into VM1's receive buffers */
    uint64_t bytes_sent;
    uint64_t frames_dropped;    /* too large for VM1's receive buffers, or
                                   longer than VPD_FRAME_MAX from VM1 */
    uint64_t descriptors_refused; /* outside a grant, malformed chains */
    uint64_t maps;              /* grants applied */
    uint64_t unmaps;            /* revocations applied */
    uint64_t bytes_mapped;      /* granted now */
    uint64_t bar_size;
};

struct vpd_device;

/* The library's ABI version (VPD_ABI_VERSION it was built with). */
unsigned vpd_abi_version(void);

/* A fixed text for a VPD_* code. */
const char *vpd_strerror(int code);

/* Connects to a bridge's peer socket and waits for its HELLO reply. On
 * success *out is the device (vpd_close ends it). On failure, when
 * error_text is not NULL, the reason is written there (NUL-terminated,
 * truncated to error_size). */
int vpd_connect(const char *peer_socket, const struct vpd_config *config,
                struct vpd_device **out, char *error_text, size_t error_size);

/* Waits at most timeout_ms (0 or negative: only looks) for the bridge, a kick or a
 * frame, and handles what came (grants, revocations, rings: callbacks).
 * Returns 1 when frames or receive room may be waiting, 0 when not, or a
 * VPD_E* code (VPD_ECLOSED once the bridge ended the connection). */
int vpd_poll(struct vpd_device *dev, int timeout_ms);

/* Called for each frame in place; must not keep its pointers. */
typedef void (*vpd_frame_fn)(void *arg, const struct vpd_frame *frame);

/* One burst over every transmit queue VM1 runs: fn sees each frame in
 * place, then the frame is given back to VM1. Returns how many frames fn
 * saw, or a VPD_E* code. */
int vpd_receive_burst(struct vpd_device *dev, vpd_frame_fn fn, void *arg);

/* Copies up to `count` frames, in order, into VM1's receive buffers of
 * `queue_pair` and publishes them. Stops at the first with no room (send it
 * again later; vpd_poll then wakes when VM1 posts buffers); one too large
 * for VM1's buffers is dropped and counted. A queue pair whose receive ring
 * is not running takes nothing (0).
 * Returns how many frames were taken (written or dropped), or a VPD_E*
 * code. */
int vpd_transmit_burst(struct vpd_device *dev, uint32_t queue_pair,
                       const struct vpd_buffer *frames, uint32_t count);

/* Copies len bytes at BAR offset bar_offset (VM1's bus address) into dst
 * when VM1 grants them for reading; VPD_EFAULT (nothing copied) when any
 * byte is not granted — never granted, or revoked. */
int vpd_read(struct vpd_device *dev, uint64_t bar_offset, void *dst, size_t len);

/* Counters; stats_size is sizeof(struct vpd_stats). */
int vpd_get_stats(struct vpd_device *dev, struct vpd_stats *stats, size_t stats_size);

/* What the last failed call on dev found, or why the connection ended; a
 * text owned by dev, valid until the next call on it. */
const char *vpd_device_error(struct vpd_device *dev);

/* Disconnects and frees dev: every mapping and fd released. */
void vpd_close(struct vpd_device *dev);

#ifdef __cplusplus
}
#endif

#endif /* VHOST_PCI_DEVICE_H */
