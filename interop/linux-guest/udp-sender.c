/* udp-sender: the Linux guest's traffic for vhost-pci-bridge's interop test
 * and linux-guest benchmark. Sends UDP datagrams to DST:PORT through the real
 * network stack (virtio-net driver, DMA API, vIOMMU when there is one), each
 * with a payload VM2 can verify, and prints what it sent and how fast.
 *
 *   udp-sender DST PORT MAC COUNT SIZE SECONDS [receive]
 *
 * MAC is put in the ARP table for DST (nobody answers ARP on the bridge's
 * other side). Stops after COUNT datagrams or SECONDS, whichever is first
 * (0: no limit). Payload: u32 magic "VPBG", u32 sequence, u32 size, then
 * bytes (sequence * 7 + i) & 0xff. Built static: the initramfs has no libc.
 *
 * receive (the guest's both mode): send from local port PORT too, and run
 * /udp-receiver PORT SECONDS from-start on the same socket in a child, so
 * that what arrives on PORT (the other side's datagrams, or ours echoed back
 * by a back end that swaps addresses and ports) is counted and checked while
 * we send; returns once both are done.
 */
#include <sys/wait.h>
#include <arpa/inet.h>
#include <errno.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 7 && !(argc == 8 && strcmp(argv[7], "receive") == 0)) {
        fprintf(stderr, "usage: udp-sender DST PORT MAC COUNT SIZE SECONDS [receive]\n");
        return 2;
    }
    const char *dst = argv[1];
    int port = atoi(argv[2]);
    unsigned mac[6];
    long count = atol(argv[4]);
    int size = atoi(argv[5]);
    double seconds = atof(argv[6]);
    if (sscanf(argv[3], "%x:%x:%x:%x:%x:%x", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6 ||
        size < 12 || size > 1472 || port <= 0 || port > 65535) {
        fprintf(stderr, "udp-sender: bad arguments\n");
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }

    struct arpreq r;
    memset(&r, 0, sizeof r);
    struct sockaddr_in *pa = (struct sockaddr_in *)&r.arp_pa;
    pa->sin_family = AF_INET;
    inet_pton(AF_INET, dst, &pa->sin_addr);
    r.arp_ha.sa_family = ARPHRD_ETHER;
    for (int i = 0; i < 6; i++) r.arp_ha.sa_data[i] = (char)mac[i];
    r.arp_flags = ATF_PERM | ATF_COM;
    strcpy(r.arp_dev, "eth0");
    if (ioctl(s, SIOCSARP, &r) < 0) { perror("SIOCSARP"); return 1; }

    pid_t receiver = -1;
    if (argc == 8) {
        struct sockaddr_in at;
        memset(&at, 0, sizeof at);
        at.sin_family = AF_INET;
        at.sin_port = htons(port);
        at.sin_addr.s_addr = htonl(INADDR_ANY);
        if (bind(s, (struct sockaddr *)&at, sizeof at) < 0) { perror("bind"); return 1; }
        fflush(stdout);
        receiver = fork();
        if (receiver < 0) { perror("fork"); return 1; }
        if (receiver == 0) {
            char fd[32];
            snprintf(fd, sizeof fd, "fd=%d", s);
            execl("/udp-receiver", "udp-receiver", argv[2], argv[6], "from-start", fd, (char *)NULL);
            perror("exec /udp-receiver");
            _exit(1);
        }
    }

    struct sockaddr_in to;
    memset(&to, 0, sizeof to);
    to.sin_family = AF_INET;
    to.sin_port = htons(port);
    inet_pton(AF_INET, dst, &to.sin_addr);

    unsigned char buf[1472];
    long sent = 0, retries = 0;
    double start = now(), end = start;
    for (uint32_t seq = 0; count == 0 || sent < count; seq++) {
        uint32_t head[3] = {0x47425056u, seq, (uint32_t)size}; /* "VPBG" little endian */
        memcpy(buf, head, sizeof head);
        for (int i = 12; i < size; i++) buf[i] = (unsigned char)((seq * 7 + i) & 0xff);
        while (sendto(s, buf, size, 0, (struct sockaddr *)&to, sizeof to) < 0) {
            if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("sendto"); return 1; }
            retries++;
            sched_yield();
        }
        sent++;
        if ((sent & 63) == 0) {
            end = now();
            if (seconds > 0 && end - start >= seconds) break;
        }
    }
    end = now();
    printf("vpb-sent %ld datagrams of %d bytes in %.3f s: %.0f pps (%ld retries)\n", sent, size, end - start,
           sent / (end - start), retries);
    fflush(stdout);
    if (receiver > 0) {
        int status;
        if (waitpid(receiver, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;
    }
    return 0;
}
