/* cpu-counter: the CPU twin of examples/gpu-counter.cu for the tests and machines without a
 * GPU. Same output, one line per 100 ms tick:
 *
 *   tick=<n> ok=<1|0> bad=<words wrong> checksum=<sum of all words, hex> mib=<MIB>
 *
 * over MIB MiB (default 16) of host memory, where word i holds i + n after tick n. Like a CUDA
 * process it has a second thread that only waits: tests/gpu/fake-cuda-checkpoint reports it
 * as the process's CUDA restore thread, which CRIU's CUDA plugin resumes and stops again.
 *
 * Build: cc -O2 -static -pthread -o cpu-counter cpu-counter.c
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void *restore_thread(void *arg) {
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 16;
    size_t n = mib * 1024 * 1024 / sizeof(uint32_t);
    uint32_t *words = malloc(n * sizeof(uint32_t));
    pthread_t t;
    if (!words || pthread_create(&t, NULL, restore_thread, NULL) != 0) {
        printf("ERROR cannot allocate %zu MiB or start a thread\n", mib);
        return 2;
    }
    for (size_t i = 0; i < n; i++)
        words[i] = (uint32_t)i;
    printf("cpu-counter: %zu MiB (pid %d)\n", mib, (int)getpid());
    fflush(stdout);
    const unsigned long long base = (unsigned long long)n * (n - 1) / 2;
    double next = now_s();
    for (uint32_t tick = 1;; tick++) {
        unsigned long long bad = 0, sum = 0;
        for (size_t i = 0; i < n; i++) {
            uint32_t v = words[i] + 1;
            words[i] = v;
            bad += v != (uint32_t)(i + tick);
            sum += v;
        }
        int ok = bad == 0 && sum == base + (unsigned long long)n * tick;
        printf("tick=%u ok=%d bad=%llu checksum=%016llx mib=%zu\n", tick, ok, bad, sum, mib);
        fflush(stdout);
        next += 0.1;
        double wait = next - now_s();
        if (wait > 0)
            usleep((useconds_t)(wait * 1e6));
        else
            next = now_s();
    }
}
