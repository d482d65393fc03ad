// Fused kernels for the bf16 decoding step (PTX built by scripts/build-ptx.sh, committed as
// fused.ptx next to this file so that builds need no CUDA compiler).
//
// bf16 is handled as raw 16-bit words: no headers, and the conversions are exact (bf16 -> f32)
// or round-to-nearest-even (f32 -> bf16), as torch's and candle's casts.

__device__ __forceinline__ float bf2f(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Interleaved RoPE: pairs (2k, 2k+1) of x [b, h, t, d] rotated by cos/sin [b, t, d/2] (f32),
// computed in f32 and rounded once, as the generic path (cast, rotate, cast back) does.
extern "C" __global__ void rope_i_bf16_f32(
    const unsigned short *x, const float *cos, const float *sin, unsigned short *dst,
    unsigned int h, unsigned int t, unsigned int half_d, unsigned int n_pairs) {
    unsigned int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n_pairs) return;
    unsigned int k = p % half_d;
    unsigned int row = p / half_d;          // (b * h + head) * t + ti
    unsigned int ti = row % t;
    unsigned int b = row / t / h;
    unsigned int ci = (b * t + ti) * half_d + k;
    float c = cos[ci], s = sin[ci];
    float x0 = bf2f(x[2 * p]), x1 = bf2f(x[2 * p + 1]);
    dst[2 * p] = f2bf(x0 * c - x1 * s);
    dst[2 * p + 1] = f2bf(x0 * s + x1 * c);
}
