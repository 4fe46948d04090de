/* udp-receiver: the Linux guest's receive side for vhost-pci-bridge's
 * linux-guest benchmark. Receives UDP on PORT through the real network stack
 * (virtio-net driver, DMA API, vIOMMU when there is one), checks every
 * datagram that carries the sender's format, and prints what it received and
 * how fast.
 *
 *   udp-receiver PORT SECONDS [from-start [fd=N]]
 *
 * Counts from the first datagram for SECONDS (or until 60 s pass without
 * one). With from-start (the guest's both mode) it counts for SECONDS from
 * its own start instead, whether or not anything arrives, and also reports
 * the valid datagrams' sequence numbers (first, highest, how many missing in
 * between, how many arrived after a higher one) and the longest time between
 * two datagrams: what a live migration's switch-over looks like from inside.
 * fd=N: receive on inherited socket N (already bound to PORT) instead of a
 * socket of its own: udp-sender's both mode, whose datagrams come back to the
 * port they were sent from when the other side echoes them.
 * A datagram of ours: u32 magic "VPBG", u32 sequence, u32 size (its
 * length), then bytes (sequence * 7 + i) & 0xff: valid, else corrupt.
 * Anything else (another generator's frames) counts as other. Built static:
 * the initramfs has no libc.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: udp-receiver PORT SECONDS [from-start [fd=N]]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    double seconds = atof(argv[2]);
    int fromStart = argc >= 4, inherited = -1;
    if (argc == 5 && sscanf(argv[4], "fd=%d", &inherited) != 1) inherited = -2;
    if (port <= 0 || port > 65535 || seconds <= 0 || (fromStart && strcmp(argv[3], "from-start") != 0) || inherited == -2) {
        fprintf(stderr, "udp-receiver: bad arguments\n");
        return 2;
    }
    int s = inherited >= 0 ? inherited : socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    int rcvbuf = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct timeval tv = { .tv_sec = 0, .tv_usec = 200000 };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in at;
    memset(&at, 0, sizeof at);
    at.sin_family = AF_INET;
    at.sin_port = htons(port);
    at.sin_addr.s_addr = htonl(INADDR_ANY);
    if (inherited < 0 && bind(s, (struct sockaddr *)&at, sizeof at) < 0) { perror("bind"); return 1; }
    printf("vpb-receiving on %d\n", port);
    fflush(stdout);

    unsigned char buf[2048];
    long received = 0, valid = 0, corrupt = 0, other = 0;
    /* from-start: sequence numbers of the valid datagrams, and the longest
     * silence between two datagrams (of any kind). */
    uint32_t first = 0, highest = 0;
    long reordered = 0;
    double longestGap = 0;
    double waited = now(), start = 0, end = 0, began = waited;
    for (;;) {
        ssize_t n = recv(s, buf, sizeof buf, 0);
        double t = now();
        if (fromStart && t - began >= seconds) break;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) { perror("recv"); return 1; }
            if (fromStart) continue;
            if (received == 0 && t - waited > 60) break;
            if (received > 0 && t - start >= seconds) break;
            continue;
        }
        if (received == 0) start = t;
        if (!fromStart && t - start >= seconds) break;
        if (received > 0 && t - end > longestGap) longestGap = t - end;
        received++;
        end = t;
        uint32_t head[3];
        if (n < 12) { other++; continue; }
        memcpy(head, buf, sizeof head);
        if (head[0] != 0x47425056u) { other++; continue; }
        int ok = head[2] == (uint32_t)n;
        for (ssize_t i = 12; ok && i < n; i++) ok = buf[i] == (unsigned char)((head[1] * 7 + i) & 0xff);
        if (!ok) { corrupt++; continue; }
        if (valid == 0) first = highest = head[1];
        else if (head[1] > highest) highest = head[1];
        else reordered++;
        valid++;
    }
    double span = end > start ? end - start : 0;
    printf("vpb-received %ld datagrams (%ld valid, %ld corrupt, %ld other) in %.3f s: %.0f pps\n", received, valid, corrupt, other,
           span, span > 0 ? received / span : 0);
    if (fromStart) {
        /* Missing: the sequence numbers between the first and the highest
         * that did not arrive (duplicates would hide as many). */
        long expected = valid > 0 ? (long)(highest - first) + 1 : 0;
        long missing = expected > valid ? expected - valid : 0;
        printf("vpb-sequence first %u last %u missing %ld reordered %ld longest-gap %.3f s\n", first, highest, missing,
               reordered, longestGap);
    }
    fflush(stdout);
    return 0;
}
