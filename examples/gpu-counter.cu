// gpu-counter: the CUDA workload of scripts/gpu-check. It holds MIB MiB (default 256) of
// device memory and, every 100 ms, increments every 32-bit word on the device and checks all
// of them there. One line per tick on stdout:
//
//   tick=<n> ok=<1|0> bad=<words wrong> checksum=<sum of all words, hex> mib=<MIB>
//
// After tick n word i holds i + n, so the checksum is known in advance and a copy restored
// from a checkpoint taken after tick n prints tick=n+1 ok=1 only if every word of its device
// memory came back. tests/gpu/cpu-counter.c is its CPU twin for machines without a GPU.
//
// Build: nvcc -O2 -arch=native -o gpu-counter gpu-counter.cu
// Usage: gpu-counter [MIB]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <unistd.h>

#define CHECK(call)                                                                     \
    do {                                                                                \
        cudaError_t err_ = (call);                                                      \
        if (err_ != cudaSuccess) {                                                      \
            printf("ERROR cuda: %s: %s\n", #call, cudaGetErrorString(err_));            \
            fflush(stdout);                                                             \
            exit(2);                                                                    \
        }                                                                               \
    } while (0)

__global__ void fill(uint32_t *words, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        words[i] = (uint32_t)i;
}

// One tick: every word + 1, then checked against i + tick; bad words and the sum counted.
__global__ void step(uint32_t *words, size_t n, uint32_t tick, unsigned long long *bad,
                     unsigned long long *sum) {
    unsigned long long my_bad = 0, my_sum = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t v = words[i] + 1;
        words[i] = v;
        if (v != (uint32_t)(i + tick)) my_bad++;
        my_sum += v;
    }
    if (my_bad) atomicAdd(bad, my_bad);
    atomicAdd(sum, my_sum);
}

static double now_s() {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], nullptr, 10) : 256;
    size_t n = mib * 1024 * 1024 / sizeof(uint32_t);
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("gpu-counter: %zu MiB on %s (pid %d)\n", mib, prop.name, (int)getpid());
    fflush(stdout);

    uint32_t *words;
    unsigned long long *counters;  // [0] bad words, [1] sum
    CHECK(cudaMalloc(&words, n * sizeof(uint32_t)));
    CHECK(cudaMalloc(&counters, 2 * sizeof(unsigned long long)));
    fill<<<1024, 256>>>(words, n);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());

    // Sum of (i + tick) for i < n: n(n-1)/2 + n*tick (no word wraps while tick < 2^32 - n).
    const unsigned long long base = (unsigned long long)n * (n - 1) / 2;
    double next = now_s();
    for (uint32_t tick = 1;; tick++) {
        CHECK(cudaMemset(counters, 0, 2 * sizeof(unsigned long long)));
        step<<<1024, 256>>>(words, n, tick, &counters[0], &counters[1]);
        CHECK(cudaGetLastError());
        unsigned long long host[2];
        CHECK(cudaMemcpy(host, counters, sizeof host, cudaMemcpyDeviceToHost));
        unsigned long long expect = base + (unsigned long long)n * tick;
        int ok = host[0] == 0 && host[1] == expect;
        printf("tick=%u ok=%d bad=%llu checksum=%016llx mib=%zu\n", tick, ok, host[0], host[1],
               mib);
        fflush(stdout);
        next += 0.1;
        double wait = next - now_s();
        if (wait > 0) usleep((useconds_t)(wait * 1e6));
        else next = now_s();  // behind (e.g. after a restore): do not catch up in a burst
    }
}
