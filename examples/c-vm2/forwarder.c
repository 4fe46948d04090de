/*
 * vpd-forwarder: a VM2 data plane in C that sends every frame VM1 transmits
 * on queue pair k back into VM1's receive buffers of queue pair k (a
 * loopback cable), through libvhost-pci-device.
 *
 *   vpd-forwarder PEER_SOCKET
 *
 * Frames are copied out of VM1's transmit buffers during the receive
 * callback (its pointers are valid only there) and written into VM1's
 * receive buffers after it; a frame that finds no room waits for the next
 * round, and is dropped (counted) when more than a ring's worth waits.
 * Totals on SIGINT/SIGTERM; exit status as vpd-counter's.
 */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <vhost_pci_device.h>

#define PENDING 1024        /* frames waiting for room */
#define FRAME_MAX VPD_FRAME_MAX /* the largest frame kept */

struct forwarder {
    uint8_t *data;          /* PENDING buffers of FRAME_MAX bytes */
    struct vpd_buffer frames[PENDING];
    uint32_t pair[PENDING];
    uint32_t head, count;   /* a ring of pending frames */
    uint64_t received, sent, dropped;
};

static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static void on_frame(void *arg, const struct vpd_frame *f) {
    struct forwarder *w = arg;
    w->received++;
    if (w->count == PENDING) {
        w->dropped++;
        return;
    }
    uint32_t slot = (w->head + w->count) % PENDING;
    uint8_t *to = w->data + (size_t)slot * FRAME_MAX;
    size_t at = 0;
    for (uint32_t i = 0; i < f->segment_count; i++) {
        if (f->segments[i].len > FRAME_MAX - at) { /* never trust a length: bound each copy */
            w->dropped++;
            return;
        }
        memcpy(to + at, f->segments[i].base, f->segments[i].len);
        at += f->segments[i].len;
    }
    w->frames[slot] = (struct vpd_buffer){.data = to, .len = (uint32_t)at};
    w->pair[slot] = f->queue_pair;
    w->count++;
}

/* Writes pending frames in order, each run of one queue pair in one call,
 * until one finds no room. Returns a VPD_E* code or 0. */
static int flush(struct vpd_device *dev, struct forwarder *w) {
    while (w->count > 0) {
        uint32_t run = 1;
        while (run < w->count && w->head + run < PENDING && w->pair[w->head + run] == w->pair[w->head]) run++;
        struct vpd_stats before, after;
        vpd_get_stats(dev, &before, sizeof before);
        int n = vpd_transmit_burst(dev, w->pair[w->head], &w->frames[w->head], run);
        if (n < 0) return n;
        vpd_get_stats(dev, &after, sizeof after);
        /* Taken: written, or dropped as too large for VM1's buffers. */
        uint64_t too_large = after.frames_dropped - before.frames_dropped;
        w->sent += (uint64_t)n - too_large;
        w->dropped += too_large;
        w->head = (w->head + (uint32_t)n) % PENDING;
        w->count -= (uint32_t)n;
        if ((uint32_t)n < run) break; /* no room: later */
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PEER_SOCKET\n", argv[0]);
        return 1;
    }
    static struct forwarder w;
    w.data = malloc((size_t)PENDING * FRAME_MAX);
    if (!w.data) return 1;
    struct vpd_config cfg = {.size = sizeof cfg};
    struct vpd_device *dev;
    char why[256];
    int rc = vpd_connect(argv[1], &cfg, &dev, why, sizeof why);
    if (rc != VPD_OK) {
        fprintf(stderr, "vpd-forwarder: %s: %s\n", vpd_strerror(rc), why);
        return 1;
    }
    /* A parent may have left these blocked (e.g. one that waits for
     * signals with signalfd): stopping must work anyway. */
    struct sigaction stop = {.sa_handler = on_signal};
    sigemptyset(&stop.sa_mask);
    sigaction(SIGINT, &stop, NULL);
    sigaction(SIGTERM, &stop, NULL);
    sigaddset(&stop.sa_mask, SIGINT);
    sigaddset(&stop.sa_mask, SIGTERM);
    sigprocmask(SIG_UNBLOCK, &stop.sa_mask, NULL);
    printf("vpd-forwarder: connected to %s\n", argv[1]);
    fflush(stdout);

    int status = 0, busy = 0;
    uint64_t reported = 0;
    time_t last = time(NULL);
    while (!stopping) {
        rc = vpd_poll(dev, busy ? 0 : w.count > 0 ? 1 : 100);
        if (rc >= 0) rc = vpd_receive_burst(dev, on_frame, &w);
        busy = rc > 0;
        if (rc >= 0) rc = flush(dev, &w);
        if (rc < 0) {
            fprintf(stderr, "vpd-forwarder: %s: %s\n", vpd_strerror(rc), vpd_device_error(dev));
            status = 2;
            break;
        }
        if (time(NULL) != last && w.received != reported) {
            printf("vpd-forwarder: %llu received, %llu sent, %llu dropped\n", (unsigned long long)w.received,
                   (unsigned long long)w.sent, (unsigned long long)w.dropped);
            fflush(stdout);
            reported = w.received;
            last = time(NULL);
        }
    }
    printf("vpd-forwarder: total %llu received, %llu sent, %llu dropped, %u waiting\n", (unsigned long long)w.received,
           (unsigned long long)w.sent, (unsigned long long)w.dropped, w.count);
    vpd_close(dev);
    free(w.data);
    return status;
}
