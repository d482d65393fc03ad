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

// Counter-based random bits (splitmix64's finaliser): the same (seed, salt, row, column) gives
// the same draw whether the step runs eagerly or replayed from a CUDA graph, and a graph needs
// no generator state of its own (the seed is read from device memory at every launch).
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float load_f32(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_f32(const unsigned short *p, size_t i) { return bf2f(p[i]); }

// One token per row of logits [rows, v] (f32, or bf16 widened exactly to f32) by the
// Gumbel-max trick, with classifier-free guidance mixed in: l = u + (c - u) * w (c = row r,
// u = row r + rows when mix), then argmax(l / temperature + G) (plain argmax when noise == 0).
// One block of 256 threads per row; ties go to the lower index, as torch.argmax. Rounded step
// by step (no fused multiply-add), as the unfused tensor ops do.
template <typename T>
__device__ void cfg_gumbel_argmax(
    const T *logits, unsigned int *out, const unsigned long long *seed,
    unsigned int rows, unsigned int v, int mix, float w, float temperature, int noise,
    unsigned int salt) {
    __shared__ float s_best[256];
    __shared__ unsigned int s_arg[256];
    unsigned int r = blockIdx.x;
    size_t c0 = (size_t)r * v;
    size_t u0 = c0 + (size_t)rows * v;
    unsigned long long base = mix64(seed[0] ^ mix64(((unsigned long long)salt << 32) | r));
    float best = -INFINITY;
    unsigned int arg = 0xffffffffu;
    for (unsigned int j = threadIdx.x; j < v; j += blockDim.x) {
        float l = load_f32(logits, c0 + j);
        if (mix) {
            float uj = load_f32(logits, u0 + j);
            l = __fadd_rn(uj, __fmul_rn(__fsub_rn(l, uj), w));
        }
        if (noise) {
            unsigned long long h = mix64(base + j);
            // 24 random bits as a uniform strictly inside (0, 1).
            float un = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
            l = __fadd_rn(__fdiv_rn(l, temperature), -logf(-logf(un)));
        }
        if (l > best || arg == 0xffffffffu) {
            best = l;
            arg = j;
        }
    }
    s_best[threadIdx.x] = best;
    s_arg[threadIdx.x] = arg;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ob = s_best[threadIdx.x + stride];
            unsigned int oa = s_arg[threadIdx.x + stride];
            float mb = s_best[threadIdx.x];
            unsigned int ma = s_arg[threadIdx.x];
            if (oa != 0xffffffffu && (ma == 0xffffffffu || ob > mb || (ob == mb && oa < ma))) {
                s_best[threadIdx.x] = ob;
                s_arg[threadIdx.x] = oa;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = s_arg[0];
}

extern "C" __global__ void cfg_gumbel_argmax_f32(
    const float *logits, unsigned int *out, const unsigned long long *seed, unsigned int rows,
    unsigned int v, int mix, float w, float temperature, int noise, unsigned int salt) {
    cfg_gumbel_argmax(logits, out, seed, rows, v, mix, w, temperature, noise, salt);
}

extern "C" __global__ void cfg_gumbel_argmax_bf16(
    const unsigned short *logits, unsigned int *out, const unsigned long long *seed,
    unsigned int rows, unsigned int v, int mix, float w, float temperature, int noise,
    unsigned int salt) {
    cfg_gumbel_argmax(logits, out, seed, rows, v, mix, w, temperature, noise, salt);
}
