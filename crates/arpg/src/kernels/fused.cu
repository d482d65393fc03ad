// Fused kernels where candle has none (compiled to PTX by crates/arpg/build.rs under the
// `cuda` feature; the Rust side of each is in the module of the same name).
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
// Row r is query r % n of sequence r / n, whose noise comes from seed[r / n]: a sequence's
// draws do not depend on the other sequences of the batch (the server batches requests).
// One block of 256 threads per row; ties go to the lower index, as torch.argmax. Rounded step
// by step (no fused multiply-add), as the unfused tensor ops do.
template <typename T>
__device__ void cfg_gumbel_argmax(
    const T *logits, unsigned int *out, const unsigned long long *seed,
    unsigned int rows, unsigned int n, unsigned int v, int mix, float w, float temperature,
    int noise, unsigned int salt) {
    __shared__ float s_best[256];
    __shared__ unsigned int s_arg[256];
    unsigned int r = blockIdx.x;
    size_t c0 = (size_t)r * v;
    size_t u0 = c0 + (size_t)rows * v;
    unsigned long long base = mix64(seed[r / n] ^ mix64(((unsigned long long)salt << 32) | (r % n)));
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
    unsigned int n, unsigned int v, int mix, float w, float temperature, int noise,
    unsigned int salt) {
    cfg_gumbel_argmax(logits, out, seed, rows, n, v, mix, w, temperature, noise, salt);
}

extern "C" __global__ void cfg_gumbel_argmax_bf16(
    const unsigned short *logits, unsigned int *out, const unsigned long long *seed,
    unsigned int rows, unsigned int n, unsigned int v, int mix, float w, float temperature,
    int noise, unsigned int salt) {
    cfg_gumbel_argmax(logits, out, seed, rows, n, v, mix, w, temperature, noise, salt);
}

__device__ __forceinline__ void store_f32(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f32(unsigned short *p, size_t i, float v) { p[i] = f2bf(v); }
__device__ __forceinline__ float round_to(const float *, float v) { return v; }
__device__ __forceinline__ float round_to(const unsigned short *, float v) { return bf2f(f2bf(v)); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (unsigned int k = 0; k < blockDim.x / 32; k++) t += red[k];
    return t;
}

// GroupNorm's affine of one value v with f32 (mean, den = sqrt(var + eps)), rounded to x's
// dtype, then, if silu, x * sigmoid(x) of that rounded value in f32 (stored rounded once).
template <typename T>
__device__ __forceinline__ float gn_affine(
    const T *x, float v, float mean, float den, float w, float b, int silu) {
    float r = round_to(x, __fadd_rn(__fmul_rn(__fdiv_rn(v - mean, den), w), b));
    return silu ? __fdiv_rn(r, 1.0f + expf(-r)) : r;
}

// GroupNorm of NCHW x (one block per (image, group): a group's channels are contiguous, n =
// channels per group * h * w elements) with f32 statistics in two passes (mean, then mean
// squared deviation) and an f32 affine, rounded to x's dtype; then, if silu, x * sigmoid(x)
// of that rounded value in f32, rounded once. The unfused path is the same arithmetic in ten
// kernels over f32 copies.
template <typename T>
__device__ void group_norm(
    const T *x, const float *w, const float *b, T *y, unsigned int n, unsigned int hw,
    unsigned int cpg, unsigned int groups, float eps, int silu) {
    __shared__ float red[32];
    size_t base = (size_t)blockIdx.x * n;
    unsigned int c0 = (blockIdx.x % groups) * cpg;
    float s = 0.0f;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) s += load_f32(x, base + i);
    float mean = block_sum(s, red) / (float)n;
    float q = 0.0f;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        float d = load_f32(x, base + i) - mean;
        q += d * d;
    }
    float den = sqrtf(block_sum(q, red) / (float)n + eps);
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        unsigned int c = c0 + i / hw;
        store_f32(y, base + i, gn_affine(x, load_f32(x, base + i), mean, den, w[c], b[c], silu));
    }
}

extern "C" __global__ void group_norm_f32(
    const float *x, const float *w, const float *b, float *y, unsigned int n, unsigned int hw,
    unsigned int cpg, unsigned int groups, float eps, int silu) {
    group_norm(x, w, b, y, n, hw, cpg, groups, eps, silu);
}

extern "C" __global__ void group_norm_bf16(
    const unsigned short *x, const float *w, const float *b, unsigned short *y, unsigned int n,
    unsigned int hw, unsigned int cpg, unsigned int groups, float eps, int silu) {
    group_norm(x, w, b, y, n, hw, cpg, groups, eps, silu);
}

// Channels a thread of the NHWC kernels moves at once: V = 1, or a 16-byte vector (8 bf16 or
// 4 f32), widened to f32.
template <int V>
__device__ __forceinline__ void load_v(const unsigned short *p, float *v) {
    if constexpr (V == 1) {
        v[0] = bf2f(p[0]);
    } else {
        uint4 u = *reinterpret_cast<const uint4 *>(p);
        unsigned int w[4] = {u.x, u.y, u.z, u.w};
        for (int k = 0; k < 4; k++) {
            v[2 * k] = bf2f((unsigned short)(w[k] & 0xffffu));
            v[2 * k + 1] = bf2f((unsigned short)(w[k] >> 16));
        }
    }
}
template <int V>
__device__ __forceinline__ void load_v(const float *p, float *v) {
    if constexpr (V == 1) {
        v[0] = p[0];
    } else {
        float4 f = *reinterpret_cast<const float4 *>(p);
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    }
}
template <int V>
__device__ __forceinline__ void store_v(unsigned short *p, const float *v) {
    if constexpr (V == 1) {
        p[0] = f2bf(v[0]);
    } else {
        unsigned int w[4];
        for (int k = 0; k < 4; k++)
            w[k] = (unsigned int)f2bf(v[2 * k]) | ((unsigned int)f2bf(v[2 * k + 1]) << 16);
        *reinterpret_cast<uint4 *>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}
template <int V>
__device__ __forceinline__ void store_v(float *p, const float *v) {
    if constexpr (V == 1) p[0] = v[0];
    else *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

// GroupNorm of NHWC x [n, hw, c] in three kernels (group_norm.rs has the CPU twin), each
// thread moving V channels at once (V > 1: c a multiple of V, 16-byte aligned rows).
// (1) Per-channel partials of position ranges: block (chunk, image); thread (lane, vector of
// channels) reads positions chunk * rows + lane, + lanes, ... (a warp reads consecutive
// channels of one position), shifted by its first value so that the sums stay well
// conditioned, and stores (count, mean, M2) at ((image * chunks + chunk) * lanes + lane) * c +
// channel. Four loads are issued before their sums (the order of the sums is unchanged): one
// load in flight per thread left the kernel at a third of the H200's bandwidth.
template <int V, typename T>
__device__ void gn_nhwc_partial(
    const T *x, float *part, unsigned int hw, unsigned int c, unsigned int rows,
    unsigned int lanes) {
    unsigned int cv = c / V;
    unsigned int chunk = blockIdx.x, img = blockIdx.y, chunks = gridDim.x;
    unsigned int lane = lanes > 1 ? threadIdx.x / cv : 0;
    if (lane >= lanes) return;
    unsigned int step = lanes > 1 ? cv : blockDim.x;
    unsigned int p0 = chunk * rows + lane, p1 = min(chunk * rows + rows, hw);
    const T *xi = x + (size_t)img * hw * c;
    for (unsigned int vc = lanes > 1 ? threadIdx.x % cv : threadIdx.x; vc < cv; vc += step) {
        float k[V], s[V], q[V];
        if (p0 < p1) load_v<V>(xi + (size_t)p0 * c + vc * V, k);
        else for (int i = 0; i < V; i++) k[i] = 0.0f;
        for (int i = 0; i < V; i++) s[i] = q[i] = 0.0f;
        unsigned int cnt = 0, p = p0;
        for (; p + 3 * lanes < p1; p += 4 * lanes) {
            float v[4][V];
            for (int u = 0; u < 4; u++) load_v<V>(xi + (size_t)(p + u * lanes) * c + vc * V, v[u]);
            for (int u = 0; u < 4; u++)
                for (int i = 0; i < V; i++) {
                    float d = v[u][i] - k[i];
                    s[i] += d;
                    q[i] += d * d;
                }
            cnt += 4;
        }
        for (; p < p1; p += lanes) {
            float v[V];
            load_v<V>(xi + (size_t)p * c + vc * V, v);
            for (int i = 0; i < V; i++) {
                float d = v[i] - k[i];
                s[i] += d;
                q[i] += d * d;
            }
            cnt++;
        }
        float fc = (float)cnt;
        for (int i = 0; i < V; i++) {
            size_t o = ((((size_t)img * chunks + chunk) * lanes + lane) * c + vc * V + i) * 3;
            part[o] = fc;
            part[o + 1] = cnt ? k[i] + s[i] / fc : 0.0f;
            part[o + 2] = cnt ? fmaxf(q[i] - s[i] * s[i] / fc, 0.0f) : 0.0f;
        }
    }
}

// (2) One block per (image, group): the group's `parts` partials per channel combined exactly
// (Chan et al.) into its mean and den = sqrt(var + eps), folded with each channel's weight and
// bias into scale = w / den and shift = b - mean * scale at ab[2 * (image * c + channel)].
extern "C" __global__ void gn_nhwc_stats(
    const float *part, const float *w, const float *b, float *ab, unsigned int c,
    unsigned int cpg, unsigned int groups, unsigned int parts, float count, float eps) {
    __shared__ float red[32];
    __shared__ float mean_den[2];
    unsigned int g = blockIdx.x % groups, img = blockIdx.x / groups;
    unsigned int items = parts * cpg;
    float sum = 0.0f;
    for (unsigned int i = threadIdx.x; i < items; i += blockDim.x) {
        size_t o = (((size_t)img * parts + i / cpg) * c + g * cpg + i % cpg) * 3;
        sum += part[o] * part[o + 1];
    }
    float mean = block_sum(sum, red) / count;
    float m2 = 0.0f;
    for (unsigned int i = threadIdx.x; i < items; i += blockDim.x) {
        size_t o = (((size_t)img * parts + i / cpg) * c + g * cpg + i % cpg) * 3;
        float d = part[o + 1] - mean;
        m2 += part[o + 2] + part[o] * d * d;
    }
    m2 = block_sum(m2, red);
    if (threadIdx.x == 0) {
        mean_den[0] = mean;
        mean_den[1] = sqrtf(m2 / count + eps);
    }
    __syncthreads();
    for (unsigned int k = threadIdx.x; k < cpg; k += blockDim.x) {
        unsigned int ch = g * cpg + k;
        float scale = __fdiv_rn(w[ch], mean_den[1]);
        size_t o = 2 * ((size_t)img * c + ch);
        ab[o] = scale;
        ab[o + 1] = __fsub_rn(b[ch], __fmul_rn(mean_den[0], scale));
    }
}

// x * scale + shift (one rounding), rounded to x's dtype, then SiLU in f32 of that value: exact
// division and expf in f32; bf16 takes the fast ones (their error is far below a bf16 step).
template <typename T>
__device__ __forceinline__ float gn_scaled(const T *x, float v, float a, float sh, int silu) {
    float r = round_to(x, __fmaf_rn(v, a, sh));
    if (!silu) return r;
    if constexpr (sizeof(T) == 2) return __fdividef(r, 1.0f + __expf(-r));
    else return __fdiv_rn(r, 1.0f + expf(-r));
}

// (3) The folded affine (and SiLU), elementwise; grid (blocks, image). When the grid's stride
// is a multiple of the vectors per row (always, for the decoder's channel counts), a thread's
// channels never change: their scale and shift are read once.
template <int V, typename T>
__device__ void gn_nhwc_apply(
    const T *x, const float *ab, T *y, unsigned int hw, unsigned int c, int silu) {
    unsigned int cv = c / V, n = hw * cv;
    unsigned int stride = gridDim.x * blockDim.x, j0 = blockIdx.x * blockDim.x + threadIdx.x;
    size_t base = (size_t)blockIdx.y * hw * c;
    const float *abi = ab + 2 * (size_t)blockIdx.y * c;
    float a[V], sh[V], v[V];
    bool fixed = stride % cv == 0;
    if (fixed)
        for (int i = 0; i < V; i++) {
            unsigned int ch = (j0 % cv) * V + i;
            a[i] = abi[2 * ch];
            sh[i] = abi[2 * ch + 1];
        }
    for (unsigned int j = j0; j < n; j += stride) {
        unsigned int ch0 = (j % cv) * V;
        load_v<V>(x + base + (size_t)j * V, v);
        for (int i = 0; i < V; i++) {
            float ai = fixed ? a[i] : abi[2 * (ch0 + i)];
            float si = fixed ? sh[i] : abi[2 * (ch0 + i) + 1];
            v[i] = gn_scaled(x, v[i], ai, si, silu);
        }
        store_v<V>(y + base + (size_t)j * V, v);
    }
}

#define GN_NHWC(suffix, T, V)                                                                   \
    extern "C" __global__ void gn_nhwc_partial##suffix(                                         \
        const T *x, float *part, unsigned int hw, unsigned int c, unsigned int rows,            \
        unsigned int lanes) {                                                                   \
        gn_nhwc_partial<V>(x, part, hw, c, rows, lanes);                                        \
    }                                                                                           \
    extern "C" __global__ void gn_nhwc_apply##suffix(                                           \
        const T *x, const float *ab, T *y, unsigned int hw, unsigned int c, int silu) {         \
        gn_nhwc_apply<V>(x, ab, y, hw, c, silu);                                                \
    }
GN_NHWC(_f32, float, 1)
GN_NHWC(_bf16, unsigned short, 1)
GN_NHWC(_v_f32, float, 4)
GN_NHWC(_v_bf16, unsigned short, 8)

// Nearest-neighbour 2x upsampling of NHWC x [n, h, w, c] as 16-byte vectors (cv of them per
// pixel); grid (blocks, image).
extern "C" __global__ void upsample2_nhwc(
    const uint4 *x, uint4 *y, unsigned int h, unsigned int w, unsigned int cv) {
    unsigned int n = 4 * h * w * cv;
    const uint4 *xi = x + (size_t)blockIdx.y * h * w * cv;
    uint4 *yi = y + (size_t)blockIdx.y * n;
    for (unsigned int j = blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += gridDim.x * blockDim.x) {
        unsigned int vc = j % cv, pix = j / cv;
        unsigned int ox = pix % (2 * w), oy = pix / (2 * w);
        yi[j] = xi[((oy / 2) * w + ox / 2) * cv + vc];
    }
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Attention softmax over keys of scores * scale, keys after the query masked when causal
// (query i of tq sees keys 0..=i + offset), in f32, rounded once to the scores' dtype. One warp
// per row of tk scores.
template <typename T>
__device__ void attn_softmax(
    const T *s, T *p, unsigned int rows, unsigned int tq, unsigned int tk, float scale,
    int causal, unsigned int offset) {
    unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    unsigned int i = r % tq;
    unsigned int lim = causal ? min(i + 1 + offset, tk) : tk;
    size_t base = (size_t)r * tk;
    float m = -INFINITY;
    for (unsigned int j = lane; j < lim; j += 32) m = fmaxf(m, __fmul_rn(load_f32(s, base + j), scale));
    m = warp_max(m);
    float sum = 0.0f;
    for (unsigned int j = lane; j < lim; j += 32) sum += expf(__fmul_rn(load_f32(s, base + j), scale) - m);
    sum = warp_sum(sum);
    for (unsigned int j = lane; j < tk; j += 32) {
        float v = j < lim ? __fdiv_rn(expf(__fmul_rn(load_f32(s, base + j), scale) - m), sum) : 0.0f;
        store_f32(p, base + j, v);
    }
}

// Its backward: grad_scores = scale * p * (g - sum_j p_j g_j), in f32, rounded once.
template <typename T>
__device__ void attn_softmax_bwd(
    const T *p, const T *g, T *gs, unsigned int rows, unsigned int tk, float scale) {
    unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    size_t base = (size_t)r * tk;
    float dot = 0.0f;
    for (unsigned int j = lane; j < tk; j += 32) dot += load_f32(p, base + j) * load_f32(g, base + j);
    dot = warp_sum(dot);
    for (unsigned int j = lane; j < tk; j += 32) {
        float pj = load_f32(p, base + j);
        store_f32(gs, base + j, scale * pj * (load_f32(g, base + j) - dot));
    }
}

extern "C" __global__ void attn_softmax_f32(
    const float *s, float *p, unsigned int rows, unsigned int tq, unsigned int tk, float scale,
    int causal, unsigned int offset) {
    attn_softmax(s, p, rows, tq, tk, scale, causal, offset);
}

extern "C" __global__ void attn_softmax_bf16(
    const unsigned short *s, unsigned short *p, unsigned int rows, unsigned int tq,
    unsigned int tk, float scale, int causal, unsigned int offset) {
    attn_softmax(s, p, rows, tq, tk, scale, causal, offset);
}

extern "C" __global__ void attn_softmax_bwd_f32(
    const float *p, const float *g, float *gs, unsigned int rows, unsigned int tk, float scale) {
    attn_softmax_bwd(p, g, gs, rows, tk, scale);
}

extern "C" __global__ void attn_softmax_bwd_bf16(
    const unsigned short *p, const unsigned short *g, unsigned short *gs, unsigned int rows,
    unsigned int tk, float scale) {
    attn_softmax_bwd(p, g, gs, rows, tk, scale);
}

// sqrt(mean(x^2) + eps) of the row of d values at base, summed by one warp; every lane gets it.
template <typename T>
__device__ float row_rms_den(const T *x, size_t base, unsigned int d, float eps, unsigned int lane) {
    float ss = 0.0f;
    for (unsigned int j = lane; j < d; j += 32) {
        float v = load_f32(x, base + j);
        ss += v * v;
    }
    return sqrtf(warp_sum(ss) / (float)d + eps);
}

// Training RMSNorm over rows of d: n = x / sqrt(mean(x^2) + eps) in f32, rounded to x's dtype,
// then y = n * w rounded (the generic path's two roundings). One warp per row.
template <typename T>
__device__ void rms_norm_fwd(
    const T *x, const T *w, T *y, unsigned int rows, unsigned int d, float eps) {
    unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    size_t base = (size_t)r * d;
    float den = row_rms_den(x, base, d, eps, lane);
    for (unsigned int j = lane; j < d; j += 32) {
        float n = round_to(x, __fdiv_rn(load_f32(x, base + j), den));
        store_f32(y, base + j, n * load_f32(w, j));
    }
}

// Its backward for x: with den = sqrt(mean(x^2) + eps), n = x / den and gn = g w,
// gx = (gn - n mean(gn n)) / den, in f32, rounded once. One warp per row.
template <typename T>
__device__ void rms_norm_bwd_x(
    const T *x, const T *w, const T *g, T *gx, unsigned int rows, unsigned int d, float eps) {
    unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    size_t base = (size_t)r * d;
    float den = row_rms_den(x, base, d, eps, lane);
    float dot = 0.0f;
    for (unsigned int j = lane; j < d; j += 32)
        dot += load_f32(g, base + j) * load_f32(w, j) * (load_f32(x, base + j) / den);
    dot = warp_sum(dot) / (float)d;
    for (unsigned int j = lane; j < d; j += 32) {
        float n = load_f32(x, base + j) / den;
        store_f32(gx, base + j, (load_f32(g, base + j) * load_f32(w, j) - n * dot) / den);
    }
}

// Each row's den = sqrt(mean(x^2) + eps), for the weight's gradient. One warp per row.
template <typename T>
__device__ void rms_norm_dens(const T *x, float *dens, unsigned int rows, unsigned int d, float eps) {
    unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    size_t base = (size_t)r * d;
    float den = row_rms_den(x, base, d, eps, lane);
    if (lane == 0) dens[r] = den;
}

// Its backward for w, per chunk of rows: part[chunk][j] = sum over the chunk's rows of g * n
// (n rounded as in the forward), in f32; the chunks are summed afterwards (no atomics, so
// the result does not depend on scheduling). blockDim (32, 8), grid (d / 32, chunks).
template <typename T>
__device__ void rms_norm_bwd_w(
    const T *x, const T *g, const float *dens, float *part, unsigned int rows, unsigned int d,
    unsigned int rows_per_chunk) {
    __shared__ float acc_s[8][33];
    unsigned int j = blockIdx.x * 32 + threadIdx.x;
    unsigned int r0 = blockIdx.y * rows_per_chunk;
    unsigned int r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.0f;
    if (j < d)
        for (unsigned int r = r0 + threadIdx.y; r < r1; r += 8) {
            size_t k = (size_t)r * d + j;
            acc += load_f32(g, k) * round_to(x, __fdiv_rn(load_f32(x, k), dens[r]));
        }
    acc_s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < d) {
        float t = 0.0f;
        for (int k = 0; k < 8; k++) t += acc_s[k][threadIdx.x];
        part[(size_t)blockIdx.y * d + j] = t;
    }
}

extern "C" __global__ void rms_norm_fwd_bf16(
    const unsigned short *x, const unsigned short *w, unsigned short *y, unsigned int rows,
    unsigned int d, float eps) {
    rms_norm_fwd(x, w, y, rows, d, eps);
}

extern "C" __global__ void rms_norm_bwd_x_bf16(
    const unsigned short *x, const unsigned short *w, const unsigned short *g, unsigned short *gx,
    unsigned int rows, unsigned int d, float eps) {
    rms_norm_bwd_x(x, w, g, gx, rows, d, eps);
}

extern "C" __global__ void rms_norm_dens_bf16(
    const unsigned short *x, float *dens, unsigned int rows, unsigned int d, float eps) {
    rms_norm_dens(x, dens, rows, d, eps);
}

extern "C" __global__ void rms_norm_bwd_w_bf16(
    const unsigned short *x, const unsigned short *g, const float *dens, float *part,
    unsigned int rows, unsigned int d, unsigned int rows_per_chunk) {
    rms_norm_bwd_w(x, g, dens, part, rows, d, rows_per_chunk);
}

// ---- The fused decoding step (Rust side: kernels/decode.rs). bf16 activations, f32 math. ----

// x' = bf16(x + y) (the residual add, rounded as the bf16 model rounds it); n = rms(x') * w,
// in f32 and rounded once (candle's inference RMSNorm), into out [2, rows, d]. One block of 128
// threads a row, 8 values a thread per pass (d % 8 == 0, d <= 4096: the Rust side checks).
extern "C" __global__ void __launch_bounds__(128) add_rms_norm_bf16(
    const unsigned short *__restrict__ x, const unsigned short *__restrict__ y,
    const unsigned short *__restrict__ w, unsigned short *__restrict__ out, unsigned int rows,
    unsigned int d, float eps) {
    __shared__ float red[4];
    size_t base = (size_t)blockIdx.x * d;
    unsigned short *xo = out + base, *no = out + (size_t)rows * d + base;
    float v[4][8], wv[4][8];
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) {
            float b[8];
            load_v<8>(x + base + j, v[c]);
            load_v<8>(y + base + j, b);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                v[c][e] = bf2f(f2bf(v[c][e] + b[e]));
                ss += v[c][e] * v[c][e];
            }
            store_v<8>(xo + j, v[c]);
        }
    }
    // The weight's loads in flight while the block sums.
#pragma unroll
    for (int c = 0; c < 4; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) load_v<8>(w + j, wv[c]);
    }
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
    __syncthreads();
    float inv = rsqrtf((red[0] + red[1] + red[2] + red[3]) / (float)d + eps);
#pragma unroll
    for (int c = 0; c < 4; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) {
            float o[8];
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = v[c][e] * inv * wv[c][e];
            store_v<8>(no + j, o);
        }
    }
}

// SwiGLU's middle: h [rows, 2 * hid] holds w1 x | w3 x; out = bf16(bf16(silu(a)) * b), the
// roundings of the bf16 composite (silu, then the product). 8 outputs a thread (hid % 8 == 0).
extern "C" __global__ void silu_mul_bf16(
    const unsigned short *__restrict__ h, unsigned short *__restrict__ out, unsigned int rows,
    unsigned int hid) {
    size_t n8 = (size_t)rows * hid / 8;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i * 8 / hid, j = i * 8 % hid;
        float a[8], b[8];
        load_v<8>(h + r * 2 * hid + j, a);
        load_v<8>(h + r * 2 * hid + hid + j, b);
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] = bf2f(f2bf(a[e] / (1.0f + expf(-a[e])))) * b[e];
        store_v<8>(out + i * 8, a);
    }
}

// silu_mul's backward: h [rows, 2 * hid] (a | b), g [rows, hid] -> out [rows, 2 * hid] =
// g b silu'(a) | g silu(a), in f32, rounded once. 8 columns a thread (hid % 8 == 0).
extern "C" __global__ void silu_mul_bwd_bf16(
    const unsigned short *__restrict__ h, const unsigned short *__restrict__ g,
    unsigned short *__restrict__ out, unsigned int rows, unsigned int hid) {
    size_t n8 = (size_t)rows * hid / 8;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i * 8 / hid, j = i * 8 % hid;
        float a[8], b[8], gg[8];
        load_v<8>(h + r * 2 * hid + j, a);
        load_v<8>(h + r * 2 * hid + hid + j, b);
        load_v<8>(g + i * 8, gg);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float s = 1.0f / (1.0f + expf(-a[e]));
            float da = gg[e] * b[e] * s * (1.0f + a[e] * (1.0f - s));
            b[e] = gg[e] * a[e] * s;
            a[e] = da;
        }
        store_v<8>(out + r * 2 * hid + j, a);
        store_v<8>(out + r * 2 * hid + hid + j, b);
    }
}

// New keys and values into a cache [2, b, nh, cap, 64] at token `at`: the rows of src
// [b, m, stride] hold each token's keys at column kcol and values at vcol (head-major); keys
// rotated by cos/sin [2, b, m, 32] (interleaved pairs, f32, rounded once). One thread a pair.
extern "C" __global__ void kv_to_cache_bf16(
    const unsigned short *src, unsigned int stride, unsigned int kcol, unsigned int vcol,
    const float *cs, unsigned short *cache, unsigned int b, unsigned int m, unsigned int nh,
    unsigned int cap, unsigned int at) {
    unsigned int n = b * m * nh * 32;
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    unsigned int p = t % 32, hh = (t / 32) % nh, i = (t / 32 / nh) % m, bb = t / 32 / nh / m;
    size_t row = (size_t)bb * m + i;
    const unsigned short *kr = src + row * stride + kcol + hh * 64;
    const unsigned short *vr = src + row * stride + vcol + hh * 64;
    float c = cs[row * 32 + p], s = cs[(size_t)b * m * 32 + row * 32 + p];
    float x0 = bf2f(kr[2 * p]), x1 = bf2f(kr[2 * p + 1]);
    size_t dst = (((size_t)bb * nh + hh) * cap + at + i) * 64 + 2 * p;
    size_t half = (size_t)b * nh * cap * 64;
    cache[dst] = f2bf(x0 * c - x1 * s);
    cache[dst + 1] = f2bf(x0 * s + x1 * c);
    cache[half + dst] = vr[2 * p];
    cache[half + dst + 1] = vr[2 * p + 1];
}

// D += A * B on the tensor cores: A 16x16 (row-major) and B 16x8 (column-major) bf16, D 16x8
// f32, in the register fragments of PTX's mma.m16n8k16 (lane = 4 * group + thread_in_group).
__device__ __forceinline__ void mma_bf16_16816(float *d, const unsigned int *a, const unsigned int *b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned int pack_bf16(unsigned short lo, unsigned short hi) {
    return (unsigned int)lo | ((unsigned int)hi << 16);
}

// 16 bytes global -> shared without registers (cp.async); `bytes` 0 writes zeros instead.
__device__ __forceinline__ void copy16_async(void *dst, const void *src, unsigned int bytes) {
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void copy_async_wait_all() {
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::);
}

// Unmasked attention of m queries per sequence over the first L keys of a cache
// [2, b, nh, cap, 64]: queries read from qsrc [b, m, stride] at column qcol (head-major),
// rotated by cos/sin [2, b, m, 32] and rounded to bf16 as the reference rotates them; out
// [b, m, nh * 64] rounded once (the heads already merged). One block of 2 warps per (head,
// sequence), 16 queries at a time; keys and values staged through shared memory 32 at a time
// (cp.async, zeros past L), 16 keys a warp: scores Q K^T on the tensor cores in f32, an online
// softmax in f32, the probabilities rounded to bf16 (as the composite's) for P V on the tensor
// cores; the two warps' partial results merged at the end. Small blocks (64 registers, 12 KB):
// 16 resident per multiprocessor, so that ARPG-L's 2,048 blocks run in one wave.
#define AT_KC 32
#define AT_PAD 72
#define AT_WARPS 2
#define AT_KW (AT_KC / AT_WARPS)

// Keys k0 .. k0 + AT_KC - 1 and their values into shared memory (zeros past L), asynchronously.
__device__ __forceinline__ void stage_chunk(
    unsigned short *ks, unsigned short *vs, const unsigned short *K, const unsigned short *V,
    unsigned int k0, unsigned int L) {
#pragma unroll
    for (int it = 0; it < AT_KC * 8 / (32 * AT_WARPS); it++) {
        unsigned int i = threadIdx.x + it * 32 * AT_WARPS, key = i / 8, c8 = (i % 8) * 8;
        bool in = k0 + key < L;
        size_t off = in ? (size_t)(k0 + key) * 64 + c8 : 0;
        copy16_async(&ks[key * AT_PAD + c8], K + off, in ? 16 : 0);
        copy16_async(&vs[key * AT_PAD + c8], V + off, in ? 16 : 0);
    }
}
extern "C" __global__ void __launch_bounds__(64, 16) cache_attention_bf16(
    const unsigned short *__restrict__ qsrc, unsigned int stride, unsigned int qcol,
    const float *__restrict__ cs, const unsigned short *__restrict__ cache, unsigned int m,
    unsigned int nh, unsigned int cap, unsigned int L, float scale,
    unsigned short *__restrict__ out) {
    // Keys then values of a chunk; after the last chunk, the warps' partial outputs.
    __shared__ __align__(16) unsigned short kvs[2 * AT_KC * AT_PAD];
    __shared__ __align__(16) unsigned short qs[16 * AT_PAD];
    __shared__ float ml[AT_WARPS][16][2];
    unsigned short *ks = kvs, *vs = kvs + AT_KC * AT_PAD;
    float(*os)[16][65] = reinterpret_cast<float(*)[16][65]>(kvs);
    unsigned int hh = blockIdx.x, bb = blockIdx.y, b = gridDim.y;
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const unsigned short *K = cache + ((size_t)bb * nh + hh) * cap * 64;
    const unsigned short *V = K + (size_t)b * nh * cap * 64;
    for (unsigned int q0 = 0; q0 < m; q0 += 16) {
        unsigned int nq = min(16u, m - q0);
        __syncthreads();  // the previous group is merged and written
        // The first chunk's copies in flight while the queries are rotated.
        stage_chunk(ks, vs, K, V, 0, L);
        for (unsigned int i = threadIdx.x; i < 16 * 32; i += 32 * AT_WARPS) {
            unsigned int r = i / 32, p = i % 32;
            unsigned short o0 = 0, o1 = 0;
            if (r < nq) {
                size_t row = (size_t)bb * m + q0 + r;
                const unsigned short *qr = qsrc + row * stride + qcol + hh * 64;
                float c = cs[row * 32 + p], s = cs[(size_t)b * m * 32 + row * 32 + p];
                float x0 = bf2f(qr[2 * p]), x1 = bf2f(qr[2 * p + 1]);
                o0 = f2bf(x0 * c - x1 * s);
                o1 = f2bf(x0 * s + x1 * c);
            }
            qs[r * AT_PAD + 2 * p] = o0;
            qs[r * AT_PAD + 2 * p + 1] = o1;
        }
        float o[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
        float mr[2] = {-INFINITY, -INFINITY}, lr[2] = {0.0f, 0.0f};
        for (unsigned int k0 = 0; k0 < L; k0 += AT_KC) {
            copy_async_wait_all();
            __syncthreads();  // the chunk (and the queries) landed
            unsigned int kw = k0 + warp * AT_KW;
            if (kw < L) {  // the same for the whole warp
                float s[AT_KW / 8][4];
#pragma unroll
                for (int j = 0; j < AT_KW / 8; j++) {
                    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
                    for (int kk = 0; kk < 4; kk++) {
                        unsigned int c0 = kk * 16 + 2 * t;
                        unsigned int qa[4] = {
                            *reinterpret_cast<const unsigned int *>(&qs[g * AT_PAD + c0]),
                            *reinterpret_cast<const unsigned int *>(&qs[(g + 8) * AT_PAD + c0]),
                            *reinterpret_cast<const unsigned int *>(&qs[g * AT_PAD + c0 + 8]),
                            *reinterpret_cast<const unsigned int *>(&qs[(g + 8) * AT_PAD + c0 + 8])};
                        const unsigned short *kr = &ks[(warp * AT_KW + j * 8 + g) * AT_PAD + c0];
                        unsigned int kb[2] = {*reinterpret_cast<const unsigned int *>(kr),
                                              *reinterpret_cast<const unsigned int *>(kr + 8)};
                        mma_bf16_16816(s[j], qa, kb);
                    }
                }
                float cmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int j = 0; j < AT_KW / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        unsigned int key = kw + j * 8 + 2 * t + (e & 1);
                        float v = key < L ? s[j][e] * scale : -INFINITY;
                        s[j][e] = v;
                        cmax[e >> 1] = fmaxf(cmax[e >> 1], v);
                    }
                float alpha[2], psum[2] = {0.0f, 0.0f};
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    cmax[r] = fmaxf(cmax[r], __shfl_xor_sync(0xffffffffu, cmax[r], 1));
                    cmax[r] = fmaxf(cmax[r], __shfl_xor_sync(0xffffffffu, cmax[r], 2));
                    float nm = fmaxf(mr[r], cmax[r]);
                    alpha[r] = expf(mr[r] - nm);
                    mr[r] = nm;
                }
#pragma unroll
                for (int j = 0; j < AT_KW / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float p = expf(s[j][e] - mr[e >> 1]);
                        s[j][e] = p;
                        psum[e >> 1] += p;
                    }
                lr[0] = lr[0] * alpha[0] + psum[0];
                lr[1] = lr[1] * alpha[1] + psum[1];
#pragma unroll
                for (int n = 0; n < 8; n++) {
                    o[n][0] *= alpha[0];
                    o[n][1] *= alpha[0];
                    o[n][2] *= alpha[1];
                    o[n][3] *= alpha[1];
                }
#pragma unroll
                for (int kk = 0; kk < AT_KW / 16; kk++) {
                    // Keys 16 kk .. 16 kk + 15 of the warp's: score tiles 2 kk and 2 kk + 1.
                    unsigned int pa[4] = {pack_bf16(f2bf(s[2 * kk][0]), f2bf(s[2 * kk][1])),
                                          pack_bf16(f2bf(s[2 * kk][2]), f2bf(s[2 * kk][3])),
                                          pack_bf16(f2bf(s[2 * kk + 1][0]), f2bf(s[2 * kk + 1][1])),
                                          pack_bf16(f2bf(s[2 * kk + 1][2]), f2bf(s[2 * kk + 1][3]))};
#pragma unroll
                    for (int n = 0; n < 8; n++) {
                        const unsigned short *v0 =
                            &vs[(warp * AT_KW + kk * 16 + 2 * t) * AT_PAD + n * 8 + g];
                        unsigned int vb[2] = {pack_bf16(v0[0], v0[AT_PAD]),
                                              pack_bf16(v0[8 * AT_PAD], v0[9 * AT_PAD])};
                        mma_bf16_16816(o[n], pa, vb);
                    }
                }
            }
            __syncthreads();  // the chunk is consumed
            if (k0 + AT_KC < L) stage_chunk(ks, vs, K, V, k0 + AT_KC, L);
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            lr[r] += __shfl_xor_sync(0xffffffffu, lr[r], 1);
            lr[r] += __shfl_xor_sync(0xffffffffu, lr[r], 2);
        }
        // The last chunk is consumed: its buffer takes the partial outputs.
        if (t == 0) {
            ml[warp][g][0] = mr[0];
            ml[warp][g][1] = lr[0];
            ml[warp][g + 8][0] = mr[1];
            ml[warp][g + 8][1] = lr[1];
        }
#pragma unroll
        for (int n = 0; n < 8; n++) {
            os[warp][g][n * 8 + 2 * t] = o[n][0];
            os[warp][g][n * 8 + 2 * t + 1] = o[n][1];
            os[warp][g + 8][n * 8 + 2 * t] = o[n][2];
            os[warp][g + 8][n * 8 + 2 * t + 1] = o[n][3];
        }
        __syncthreads();
        for (unsigned int i = threadIdx.x; i < 16 * 64; i += 32 * AT_WARPS) {
            unsigned int r = i / 64, dd = i % 64;
            if (r >= nq) continue;
            float M = fmaxf(ml[0][r][0], ml[1][r][0]);
            float num = 0.0f, den = 0.0f;
#pragma unroll
            for (int w = 0; w < AT_WARPS; w++) {
                float f = ml[w][r][1] > 0.0f ? expf(ml[w][r][0] - M) : 0.0f;
                num += f * os[w][r][dd];
                den += f * ml[w][r][1];
            }
            out[((size_t)bb * m + q0 + r) * nh * 64 + hh * 64 + dd] = f2bf(num / den);
        }
    }
}

// AdamW in place (kernels/adamw.rs), every rounding explicit so that nothing is contracted
// into an FMA: the roundings of the composite of candle ops. A moment: x = x * mul + g' * cg
// with g' = g * gscale when clipping (the second moment squares g' first).
extern "C" __global__ void adamw_moment_f32(
    float *__restrict__ x, const float *__restrict__ g, unsigned long long n, float mul,
    float cg, float gscale, int do_scale, int second) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gi = do_scale ? __fmul_rn(g[i], gscale) : g[i];
        if (second) gi = __fmul_rn(gi, gi);
        x[i] = __fadd_rn(__fmul_rn(x[i], mul), __fmul_rn(gi, cg));
    }
}

// The weight: w = w * decay (matrices) - (m / (sqrt(v) * inv_bc2s + eps)) * step.
extern "C" __global__ void adamw_weight_f32(
    float *__restrict__ w, const float *__restrict__ m, const float *__restrict__ v,
    unsigned long long n, float decay, int do_decay, float inv_bc2s, float eps, float step) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float wi = do_decay ? __fmul_rn(w[i], decay) : w[i];
        float den = __fadd_rn(__fmul_rn(__fsqrt_rn(v[i]), inv_bc2s), eps);
        w[i] = __fsub_rn(wi, __fmul_rn(__fdiv_rn(m[i], den), step));
    }
}

// Dropout from a counter-based generator (kernels/dropout.rs computes the same on the CPU):
// element i survives when the 24-bit hash of (seed, i) is at least thr. out = round(y * s)
// where it survives, else 0; with `add`, plus x (rounded once more), the residual add.
__device__ __forceinline__ unsigned int fmix32(unsigned int h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}
__device__ __forceinline__ bool drop_keep(size_t i, unsigned int lo, unsigned int hi, unsigned int thr) {
    return (fmix32(fmix32((unsigned int)i ^ lo) ^ hi) >> 8) >= thr;
}
template <typename T>
__device__ __forceinline__ void dropout_impl(
    const T *__restrict__ y, const T *__restrict__ x, T *__restrict__ out, unsigned int n,
    unsigned int lo, unsigned int hi, unsigned int thr, float s, int add) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        bool keep = drop_keep(i, lo, hi, thr);
        float d = keep ? round_to(y, __fmul_rn(load_f32(y, i), s)) : 0.0f;
        store_f32(out, i, add ? __fadd_rn(load_f32(x, i), d) : d);
    }
}
extern "C" __global__ void dropout_bf16(
    const unsigned short *y, const unsigned short *x, unsigned short *out, unsigned int n,
    unsigned int lo, unsigned int hi, unsigned int thr, float s, int add) {
    dropout_impl(y, x, out, n, lo, hi, thr, s, add);
}
extern "C" __global__ void dropout_f32(
    const float *y, const float *x, float *out, unsigned int n, unsigned int lo,
    unsigned int hi, unsigned int thr, float s, int add) {
    dropout_impl(y, x, out, n, lo, hi, thr, s, add);
}

// Cross entropy of logits [rows, v] (bf16 or f32) against targets: either the per-row loss
// logsumexp(row) - row[t] (f32), or the gradient (softmax(row) - onehot(t)) * gscale rounded
// once to the logits' dtype. One block of 256 threads per row; an online max and sum per
// thread, combined over the block.
template <bool GRAD, typename T>
__device__ void cross_entropy_impl(
    const T *logits, const unsigned int *targets, float *loss, T *grad, unsigned int v,
    float gscale) {
    __shared__ float red[32];
    size_t base = (size_t)blockIdx.x * v;
    float m = -INFINITY, s = 0.0f;
    for (unsigned int i = threadIdx.x; i < v; i += blockDim.x) {
        float x = load_f32(logits, base + i);
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    float mm = m;
    for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = mm;
    __syncthreads();
    float big = -INFINITY;
    for (unsigned int k = 0; k < blockDim.x / 32; k++) big = fmaxf(big, red[k]);
    float total = block_sum(m == -INFINITY ? 0.0f : s * expf(m - big), red);
    float lse = big + logf(total);
    unsigned int t = targets[blockIdx.x];
    if constexpr (GRAD) {
        for (unsigned int i = threadIdx.x; i < v; i += blockDim.x) {
            float p = expf(load_f32(logits, base + i) - lse);
            store_f32(grad, base + i, (p - (i == t ? 1.0f : 0.0f)) * gscale);
        }
    } else if (threadIdx.x == 0) {
        loss[blockIdx.x] = lse - load_f32(logits, base + t);
    }
}
extern "C" __global__ void cross_entropy_loss_bf16(
    const unsigned short *logits, const unsigned int *targets, float *loss, unsigned int v) {
    cross_entropy_impl<false>(logits, targets, loss, (unsigned short *)0, v, 0.0f);
}
extern "C" __global__ void cross_entropy_loss_f32(
    const float *logits, const unsigned int *targets, float *loss, unsigned int v) {
    cross_entropy_impl<false>(logits, targets, loss, (float *)0, v, 0.0f);
}
extern "C" __global__ void cross_entropy_grad_bf16(
    const unsigned short *logits, const unsigned int *targets, unsigned short *grad,
    unsigned int v, float gscale) {
    cross_entropy_impl<true>(logits, targets, (float *)0, grad, v, gscale);
}
extern "C" __global__ void cross_entropy_grad_f32(
    const float *logits, const unsigned int *targets, float *grad, unsigned int v,
    float gscale) {
    cross_entropy_impl<true>(logits, targets, (float *)0, grad, v, gscale);
}

// Partial sums of squares of g [n] (f32): block k of a fixed grid sums elements k * 256 + j
// (j < 256) and every grid-stride after them, and writes out[k]. Deterministic (no atomics).
extern "C" __global__ void squared_partials_f32(
    float *__restrict__ out, const float *__restrict__ g, unsigned long long n) {
    __shared__ float red[32];
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        s += g[i] * g[i];
    float t = block_sum(s, red);
    if (threadIdx.x == 0) out[blockIdx.x] = t;
}

// An embedding table's gradient (kernels/embedding.rs): block r sums, column by column, the
// gradient rows order[offsets[r] .. offsets[r + 1]] in that order (f32), into out[r].
template <typename T>
__device__ void embedding_bwd(
    const T *g, const unsigned int *order, const unsigned int *offsets, float *out,
    unsigned int d) {
    unsigned int r = blockIdx.x, a = offsets[r], b = offsets[r + 1];
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        float s = 0.0f;
        for (unsigned int k = a; k < b; k++) s += load_f32(g, (size_t)order[k] * d + c);
        out[(size_t)r * d + c] = s;
    }
}
extern "C" __global__ void embedding_bwd_bf16(
    const unsigned short *g, const unsigned int *order, const unsigned int *offsets, float *out,
    unsigned int d) {
    embedding_bwd(g, order, offsets, out, d);
}
extern "C" __global__ void embedding_bwd_f32(
    const float *g, const unsigned int *order, const unsigned int *offsets, float *out,
    unsigned int d) {
    embedding_bwd(g, order, offsets, out, d);
}

// Attention's layout changes (kernels/heads.rs): one thread per channel pair. split: columns
// col.. of x [b, t, stride] to [b, h, t, hd]; else [b, h, t, hd] to [b, t, h * hd] (stride =
// h * hd, col 0). With rotate, the pair turns by cs [2, b, t, hd / 2] (by the opposite angle
// with inverse), in f32, rounded once, as rope_i does.
template <typename T>
__device__ void heads_impl(
    const T *x, const float *cs, T *out, unsigned int b, unsigned int t, unsigned int h,
    unsigned int hd, unsigned int stride, unsigned int col, unsigned int split, int rotate,
    int inverse) {
    unsigned int half = hd / 2;
    size_t n = (size_t)b * t * h * half;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int p = i % half, hh = (i / half) % h;
    size_t bt = i / half / h;  // bb * t + tt
    unsigned int tt = bt % t, bb = bt / t;
    size_t flat = bt * stride + col + (size_t)hh * hd + 2 * p;
    size_t heads = (((size_t)bb * h + hh) * t + tt) * hd + 2 * p;
    size_t src = split ? flat : heads, dst = split ? heads : flat;
    float x0 = load_f32(x, src), x1 = load_f32(x, src + 1);
    if (rotate) {
        float c = cs[bt * half + p], s = cs[(size_t)b * t * half + bt * half + p];
        if (inverse) s = -s;
        store_f32(out, dst, x0 * c - x1 * s);
        store_f32(out, dst + 1, x1 * c + x0 * s);
    } else {
        store_f32(out, dst, x0);
        store_f32(out, dst + 1, x1);
    }
}
extern "C" __global__ void heads_bf16(
    const unsigned short *x, const float *cs, unsigned short *out, unsigned int b,
    unsigned int t, unsigned int h, unsigned int hd, unsigned int stride, unsigned int col,
    unsigned int split, int rotate, int inverse) {
    heads_impl(x, cs, out, b, t, h, hd, stride, col, split, rotate, inverse);
}
extern "C" __global__ void heads_f32(
    const float *x, const float *cs, float *out, unsigned int b, unsigned int t, unsigned int h,
    unsigned int hd, unsigned int stride, unsigned int col, unsigned int split, int rotate,
    int inverse) {
    heads_impl(x, cs, out, b, t, h, hd, stride, col, split, rotate, inverse);
}

// ---- The training step's residual stream (Rust side: kernels/residual_norm.rs), bf16. ----
// One block of 128 threads a row, 8 values a thread per pass (d % 8 == 0, d <= 4096: the Rust
// side checks); the dropout hash of dropout_impl on the flat index (row * d + column).


// Sum over a block of 128 threads; every thread gets it.
__device__ __forceinline__ float block128_sum(float v, float *red) {
    v = warp_sum(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    return red[0] + red[1] + red[2] + red[3];
}

// s = x + dropout(y) (dropout_bf16's add: y * scale rounded where kept, then the add rounded;
// plain x + y rounded without it; x absent: 0), n = rms_norm(s) * w (rms_norm_fwd's roundings),
// into out [2, rows, d].
template <int C>
__device__ __forceinline__ void add_norm_train(
    const unsigned short *__restrict__ x, const unsigned short *__restrict__ y,
    const unsigned short *__restrict__ w, unsigned short *__restrict__ out, unsigned int rows,
    unsigned int d, float eps, int has_x, int drop, unsigned int lo, unsigned int hi,
    unsigned int thr, float scale) {
    __shared__ float red[4];
    size_t base = (size_t)blockIdx.x * d;
    unsigned short *so = out + base, *no = out + (size_t)rows * d + base;
    float v[C][8], wv[C][8];
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < C; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) {
            float a[8];
            load_v<8>(y + base + j, v[c]);
            if (has_x) load_v<8>(x + base + j, a);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float t = v[c][e];
                if (drop) t = drop_keep(base + j + e, lo, hi, thr) ? bf2f(f2bf(__fmul_rn(t, scale))) : 0.0f;
                if (has_x) t = bf2f(f2bf(__fadd_rn(a[e], t)));
                v[c][e] = t;
                ss += t * t;
            }
            store_v<8>(so + j, v[c]);
        }
    }
#pragma unroll
    for (int c = 0; c < C; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) load_v<8>(w + j, wv[c]);
    }
    float den = sqrtf(block128_sum(ss, red) / (float)d + eps);
#pragma unroll
    for (int c = 0; c < C; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) {
            float o[8];
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = bf2f(f2bf(__fdiv_rn(v[c][e], den))) * wv[c][e];
            store_v<8>(no + j, o);
        }
    }
}

// The norm's backward where its input also flows on through the residual: with den =
// sqrt(mean(x^2) + eps), n = x / den, gx = (g w - n mean(g w n)) / den rounded (rms_norm_bwd_x);
// total = res + gx rounded (without res: gx); dropped = dropout(total) (dropout_bf16 without
// the add). out [2, rows, d] = total | dropped (dropped only with drop). Each block also sums
// g * round(n) over its rows_per_block rows into part[block, d] (f32, the weight's gradient:
// each thread owns the same 8 columns of every row, so no atomics).
template <int C>
__device__ __forceinline__ void norm_bwd_train(
    const unsigned short *__restrict__ x, const unsigned short *__restrict__ w,
    const unsigned short *__restrict__ g, const unsigned short *__restrict__ res,
    unsigned short *__restrict__ out, float *__restrict__ part, unsigned int rows,
    unsigned int d, unsigned int rows_per_block, float eps, int has_res, int drop,
    unsigned int lo, unsigned int hi, unsigned int thr, float scale) {
    __shared__ float red[4];
    float wv[C][8], acc[C][8];
#pragma unroll
    for (int c = 0; c < C; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) load_v<8>(w + j, wv[c]);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[c][e] = 0.0f;
    }
    unsigned int r0 = blockIdx.x * rows_per_block, r1 = min(rows, r0 + rows_per_block);
    for (unsigned int r = r0; r < r1; r++) {
        size_t base = (size_t)r * d;
        float xv[C][8], gv[C][8];
        float ss = 0.0f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            unsigned int j = (threadIdx.x + c * 128) * 8;
            if (j < d) {
                load_v<8>(x + base + j, xv[c]);
                load_v<8>(g + base + j, gv[c]);
#pragma unroll
                for (int e = 0; e < 8; e++) ss += xv[c][e] * xv[c][e];
            }
        }
        float den = sqrtf(block128_sum(ss, red) / (float)d + eps);
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            unsigned int j = (threadIdx.x + c * 128) * 8;
            if (j < d) {
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    dot += gv[c][e] * wv[c][e] * (xv[c][e] / den);
                    acc[c][e] += gv[c][e] * bf2f(f2bf(__fdiv_rn(xv[c][e], den)));
                }
            }
        }
        dot = block128_sum(dot, red) / (float)d;
#pragma unroll
        for (int c = 0; c < C; c++) {
            unsigned int j = (threadIdx.x + c * 128) * 8;
            if (j < d) {
                float t[8], rv[8];
                if (has_res) load_v<8>(res + base + j, rv);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float n = xv[c][e] / den;
                    float gx = bf2f(f2bf((gv[c][e] * wv[c][e] - n * dot) / den));
                    t[e] = has_res ? bf2f(f2bf(__fadd_rn(rv[e], gx))) : gx;
                }
                store_v<8>(out + base + j, t);
                if (drop) {
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        t[e] = drop_keep(base + j + e, lo, hi, thr) ? __fmul_rn(t[e], scale) : 0.0f;
                    store_v<8>(out + (size_t)rows * d + base + j, t);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < C; c++) {
        unsigned int j = (threadIdx.x + c * 128) * 8;
        if (j < d) {
            store_v<4>(part + (size_t)blockIdx.x * d + j, acc[c]);
            store_v<4>(part + (size_t)blockIdx.x * d + j + 4, acc[c] + 4);
        }
    }
}

#define RESIDUAL_NORM(C)                                                                        \
    extern "C" __global__ void __launch_bounds__(128) add_norm_train_c##C##_bf16(               \
        const unsigned short *x, const unsigned short *y, const unsigned short *w,              \
        unsigned short *out, unsigned int rows, unsigned int d, float eps, int has_x, int drop, \
        unsigned int lo, unsigned int hi, unsigned int thr, float scale) {                      \
        add_norm_train<C>(x, y, w, out, rows, d, eps, has_x, drop, lo, hi, thr, scale);         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) norm_bwd_train_c##C##_bf16(               \
        const unsigned short *x, const unsigned short *w, const unsigned short *g,              \
        const unsigned short *res, unsigned short *out, float *part, unsigned int rows,         \
        unsigned int d, unsigned int rows_per_block, float eps, int has_res, int drop,          \
        unsigned int lo, unsigned int hi, unsigned int thr, float scale) {                      \
        norm_bwd_train<C>(x, w, g, res, out, part, rows, d, rows_per_block, eps, has_res, drop, \
                          lo, hi, thr, scale);                                                  \
    }
RESIDUAL_NORM(1)
RESIDUAL_NORM(2)
RESIDUAL_NORM(4)

// heads_impl with 8 channels (4 pairs) a thread and 16-byte accesses (hd, stride and col
// multiples of 8). The same arithmetic.
extern "C" __global__ void heads8_bf16(
    const unsigned short *__restrict__ x, const float *__restrict__ cs,
    unsigned short *__restrict__ out, unsigned int b, unsigned int t, unsigned int h,
    unsigned int hd, unsigned int stride, unsigned int col, unsigned int split, int rotate,
    int inverse) {
    unsigned int half = hd / 2, oct = hd / 8;
    size_t n = (size_t)b * t * h * oct;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int q = i % oct, hh = (i / oct) % h;
    size_t bt = i / oct / h;
    unsigned int tt = bt % t, bb = bt / t;
    size_t flat = bt * stride + col + (size_t)hh * hd + 8 * q;
    size_t heads = (((size_t)bb * h + hh) * t + tt) * hd + 8 * q;
    size_t src = split ? flat : heads, dst = split ? heads : flat;
    float v[8], o[8];
    load_v<8>(x + src, v);
    if (rotate) {
        float c[4], s[4];
        load_v<4>(cs + bt * half + 4 * q, c);
        load_v<4>(cs + (size_t)b * t * half + bt * half + 4 * q, s);
#pragma unroll
        for (int p = 0; p < 4; p++) {
            float sn = inverse ? -s[p] : s[p];
            o[2 * p] = v[2 * p] * c[p] - v[2 * p + 1] * sn;
            o[2 * p + 1] = v[2 * p + 1] * c[p] + v[2 * p] * sn;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = v[e];
    }
    store_v<8>(out + dst, o);
}

// attn_softmax with the row held in registers (tk <= 32 K): one read of the scores, one
// exp per element; the same order of operations, so the same results.
template <int K, typename T>
__device__ void attn_softmax_reg(
    const T *s, T *p, unsigned int rows, unsigned int tq, unsigned int tk, float scale,
    int causal, unsigned int offset) {
    unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    unsigned int i = r % tq;
    unsigned int lim = causal ? min(i + 1 + offset, tk) : tk;
    size_t base = (size_t)r * tk;
    float v[K];
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; k++) {
        unsigned int j = lane + 32 * k;
        v[k] = j < lim ? __fmul_rn(load_f32(s, base + j), scale) : -INFINITY;
        m = fmaxf(m, v[k]);
    }
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        unsigned int j = lane + 32 * k;
        v[k] = j < lim ? expf(v[k] - m) : 0.0f;
        sum += v[k];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int k = 0; k < K; k++) {
        unsigned int j = lane + 32 * k;
        if (j < tk) store_f32(p, base + j, j < lim ? __fdiv_rn(v[k], sum) : 0.0f);
    }
}

template <int K, typename T>
__device__ void attn_softmax_bwd_reg(
    const T *p, const T *g, T *gs, unsigned int rows, unsigned int tk, float scale) {
    unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    size_t base = (size_t)r * tk;
    float pv[K], gv[K];
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        unsigned int j = lane + 32 * k;
        pv[k] = j < tk ? load_f32(p, base + j) : 0.0f;
        gv[k] = j < tk ? load_f32(g, base + j) : 0.0f;
        if (j < tk) dot += pv[k] * gv[k];
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int k = 0; k < K; k++) {
        unsigned int j = lane + 32 * k;
        if (j < tk) store_f32(gs, base + j, scale * pv[k] * (gv[k] - dot));
    }
}

#define ATTN_SOFTMAX_REG(K)                                                                     \
    extern "C" __global__ void attn_softmax_r##K##_bf16(                                        \
        const unsigned short *s, unsigned short *p, unsigned int rows, unsigned int tq,         \
        unsigned int tk, float scale, int causal, unsigned int offset) {                        \
        attn_softmax_reg<K>(s, p, rows, tq, tk, scale, causal, offset);                         \
    }                                                                                           \
    extern "C" __global__ void attn_softmax_r##K##_f32(                                         \
        const float *s, float *p, unsigned int rows, unsigned int tq, unsigned int tk,          \
        float scale, int causal, unsigned int offset) {                                         \
        attn_softmax_reg<K>(s, p, rows, tq, tk, scale, causal, offset);                         \
    }                                                                                           \
    extern "C" __global__ void attn_softmax_bwd_r##K##_bf16(                                    \
        const unsigned short *p, const unsigned short *g, unsigned short *gs,                   \
        unsigned int rows, unsigned int tk, float scale) {                                      \
        attn_softmax_bwd_reg<K>(p, g, gs, rows, tk, scale);                                     \
    }                                                                                           \
    extern "C" __global__ void attn_softmax_bwd_r##K##_f32(                                     \
        const float *p, const float *g, float *gs, unsigned int rows, unsigned int tk,          \
        float scale) {                                                                          \
        attn_softmax_bwd_reg<K>(p, g, gs, rows, tk, scale);                                     \
    }
ATTN_SOFTMAX_REG(4)
ATTN_SOFTMAX_REG(9)
ATTN_SOFTMAX_REG(16)

// bf16 -> f32 (exact), 8 values a thread (Rust side: kernels/widen.rs); n8 = n / 8 vectors,
// the tail of n % 8 by the first threads.
extern "C" __global__ void widen_bf16_f32(
    const unsigned short *__restrict__ x, float *__restrict__ y, unsigned long long n) {
    size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, step = (size_t)gridDim.x * blockDim.x;
    // Vectors only where both buffers sit on 16-byte boundaries (else one value a thread).
    if ((((unsigned long long)x) | ((unsigned long long)y)) % 16 != 0) {
        for (size_t i = start; i < n; i += step) y[i] = bf2f(x[i]);
        return;
    }
    size_t n8 = n / 8;
    for (size_t i = start; i < n8; i += step) {
        float v[8];
        load_v<8>(x + 8 * i, v);
        store_v<4>(y + 8 * i, v);
        store_v<4>(y + 8 * i + 4, v + 4);
    }
    if (start < n % 8) y[n8 * 8 + start] = bf2f(x[n8 * 8 + start]);
}
