/*
 * vpd-counter: a VM2 data plane in C that counts every frame VM1 transmits,
 * read in place in VM1's memory through libvhost-pci-device.
 *
 *   vpd-counter PEER_SOCKET
 *
 * Prints a line a second while the count changes, and the totals on
 * SIGINT/SIGTERM. Exit status: 0 after a signal, 1 when it cannot connect,
 * 2 when the bridge ends the connection.
 */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <vhost_pci_device.h>

struct counts {
    uint64_t frames, bytes, not_ethernet, revocations, rings;
};

static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

/* The Ethernet header is read in place; it may span segments. */
static void on_frame(void *arg, const struct vpd_frame *f) {
    struct counts *c = arg;
    uint8_t eth[14];
    size_t got = 0;
    for (uint32_t i = 0; i < f->segment_count && got < sizeof eth; i++) {
        size_t n = f->segments[i].len < sizeof eth - got ? f->segments[i].len : sizeof eth - got;
        memcpy(eth + got, f->segments[i].base, n);
        got += n;
    }
    uint16_t type = got == sizeof eth ? (uint16_t)(eth[12] << 8 | eth[13]) : 0;
    if (type < 0x0600) c->not_ethernet++; /* a length, not an EtherType, or too short */
    c->frames++;
    c->bytes += f->length;
}

static void on_revoked(void *ctx, uint64_t offset, uint64_t length) {
    (void)offset; (void)length;
    ((struct counts *)ctx)->revocations++;
}

static void on_ring_started(void *ctx, uint32_t queue) {
    (void)queue;
    ((struct counts *)ctx)->rings++;
}

static void report(const char *what, const struct counts *c, struct vpd_device *dev) {
    struct vpd_stats s;
    if (vpd_get_stats(dev, &s, sizeof s) != VPD_OK) memset(&s, 0, sizeof s);
    printf("vpd-counter: %s%llu frames, %llu bytes, %llu not Ethernet, %llu revocations, %llu refused\n", what,
           (unsigned long long)c->frames, (unsigned long long)c->bytes, (unsigned long long)c->not_ethernet,
           (unsigned long long)c->revocations, (unsigned long long)s.descriptors_refused);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PEER_SOCKET\n", argv[0]);
        return 1;
    }
    struct counts c = {0};
    struct vpd_callbacks cb = {.revoked = on_revoked, .ring_started = on_ring_started};
    struct vpd_config cfg = {.size = sizeof cfg, .callbacks = &cb, .ctx = &c};
    struct vpd_device *dev;
    char why[256];
    int rc = vpd_connect(argv[1], &cfg, &dev, why, sizeof why);
    if (rc != VPD_OK) {
        fprintf(stderr, "vpd-counter: %s: %s\n", vpd_strerror(rc), why);
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
    printf("vpd-counter: connected to %s (ABI %u)\n", argv[1], vpd_abi_version());
    fflush(stdout);

    int status = 0;
    uint64_t reported = 0;
    time_t last = time(NULL);
    int busy = 0;
    while (!stopping) {
        /* Look at the bridge between bursts (ring stops, grants); sleep
         * only when the last burst found nothing. */
        rc = vpd_poll(dev, busy ? 0 : 100);
        if (rc >= 0) rc = vpd_receive_burst(dev, on_frame, &c);
        busy = rc > 0;
        if (rc < 0) {
            fprintf(stderr, "vpd-counter: %s: %s\n", vpd_strerror(rc), vpd_device_error(dev));
            status = 2;
            break;
        }
        if (time(NULL) != last && c.frames != reported) {
            report("", &c, dev);
            reported = c.frames;
            last = time(NULL);
        }
    }
    report("total ", &c, dev);
    vpd_close(dev);
    return status;
}
