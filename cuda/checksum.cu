// Checksums of the pipeline messages that travel between devices (the device links'
// counterpart of the CRC32 that host messages carry, src/runtime/wire.rs), and the fault
// injection that damages a message.
//
// The checksum of a message of `bytes` bytes (even: bf16 or fp32 elements) is the sum, modulo
// 2^64, of mix(i << 32 | w_i) over its little-endian 32-bit words w_i (a trailing half word
// zero-extended), where mix is splitmix64's finaliser, a bijection of 64-bit values. Any change
// confined to one word changes exactly one term, so it is always detected; a word moved to
// another place changes its term too; other damage goes unnoticed with probability about
// 2^-64. A sum of integer terms is the same in any order: the result does not depend on the grid
// or on the order of the atomics. Twin of `troupe::gpu::ops::checksum::message_checksum_host`.
//
// Launch: message_checksum on a 1-D grid of 1 to 1024 blocks of 256 threads (grid-stride; any
// block size that is a multiple of 32, at most 1024), `data` 4-byte aligned, `out` zeroed first
// (the blocks add into it). message_damage on one block of 32 threads.

__device__ __forceinline__ unsigned long long checksum_mix(unsigned long long x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

extern "C" __global__ void message_checksum(const unsigned char* __restrict__ data, unsigned long long bytes,
                                            unsigned long long* __restrict__ out) {
    __shared__ unsigned long long partial[32];
    const unsigned int* words = (const unsigned int*)data;
    const unsigned long long n = bytes >> 2;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long sum = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        sum += checksum_mix((i << 32) | words[i]);
    if ((bytes & 2) && blockIdx.x == 0 && threadIdx.x == 0) {
        const unsigned int last = ((const unsigned short*)data)[2 * n];
        sum += checksum_mix((n << 32) | last);
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long total = 0;
        for (unsigned int w = 0; w < (blockDim.x >> 5); ++w) total += partial[w];
        atomicAdd(out, total);
    }
}
EXPORT_KERNEL(message_checksum);

// Fault injection: flips bit 6 of the message's first byte (in bf16 the first element's top
// mantissa bit, the bit the host path's injected corruption flips; in fp32 a low one).
extern "C" __global__ void message_damage(unsigned char* data) {
    if (blockIdx.x == 0 && threadIdx.x == 0) data[0] ^= 0x40;
}
EXPORT_KERNEL(message_damage);
