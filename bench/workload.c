/* Benchmark workload: dirties N MiB of anonymous memory, then wakes every millisecond and
 * records the longest gap it has seen between two wake-ups (what a timer-sensitive service
 * feels during a checkpoint's freeze). Built static so it runs in a busybox rootfs.
 *   workload MIB [random]     writes /tmp/ready when filled, /tmp/maxgap_us on every new max;
 *                             /tmp/reset (created by the benchmark) resets the max. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static void put(const char *path, uint64_t v) {
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "%llu\n", (unsigned long long)v);
        fclose(f);
    }
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    int random = argc > 2 && strcmp(argv[2], "random") == 0;
    size_t n = mib << 20;
    uint8_t *buf = malloc(n);
    if (!buf) return 1;
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v;
        if (random) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; v = x; }
        else v = (i / 4096) * 0x0101010101010101ull; /* compressible: one byte value per page */
        memcpy(buf + i, &v, 8);
    }
    put("/tmp/ready", 1);
    uint64_t last = now_us(), max = 0, beats = 0;
    struct timespec ms = {0, 1000000};
    for (;;) {
        nanosleep(&ms, NULL);
        uint64_t t = now_us();
        if (access("/tmp/reset", F_OK) == 0) { unlink("/tmp/reset"); max = 0; put("/tmp/maxgap_us", 0); }
        else if (t - last > max) { max = t - last; put("/tmp/maxgap_us", max); }
        last = t;
        /* keep touching memory so it stays dirty and resident */
        buf[(beats++ * 4096) % n] ^= 1;
    }
}
