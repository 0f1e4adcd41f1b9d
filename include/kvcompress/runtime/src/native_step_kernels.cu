// The native decode step's kernels (see native_step_kernels.cuh). Arithmetic in float32, inputs
// and outputs in the model's dtype, rounded where the TorchScript step rounds them (rotated q/k,
// the cos/sin factors), so that the two steps agree to the dtype's rounding.
#include "native_step_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdio>
#include <limits>
#include <mutex>
#include <utility>

namespace kvcompress {
namespace runtime {
namespace kernels {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

constexpr int kThreads = 128;
constexpr int kMaxHeadDim = 256;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Programmatic dependent launch (sm_90 and later): a kernel launched early waits here until the
// previous kernel has finished and its writes are visible (at once when launched plainly), then
// lets the next early-launched kernel start its blocks in turn. Before this, a kernel reads
// nothing another kernel writes: only the step's inputs, and it prefetches.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A hint: the cache line holding p (a valid address) into L2; no register is written.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Block-wide max / sum over Threads threads (every thread gets the result).
template <int Threads>
__device__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < Threads / 32; ++w) r = fmaxf(r, scratch[w]);
  return r;
}
template <int Threads>
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < Threads / 32; ++w) r += scratch[w];
  return r;
}

// Rotated value of dim d of x (GPT-NeoX partial rotary, factors rounded to T as the TorchScript
// step's cos / sin are; the result rounded to T as its q / k are).
template <typename T>
__device__ float rotate(const float* x, int d, int64_t rotary_ndims, float rotary_base, float position) {
  if (d >= rotary_ndims) return x[d];
  const int half = static_cast<int>(rotary_ndims / 2);
  const int i = d % half;
  const float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_ndims);
  const float inv_freq = 1.0f / powf(rotary_base, exponent);
  const float angle = position * inv_freq;
  const float c = round_to<T>(cosf(angle)), s = round_to<T>(sinf(angle));
  const float partner = d < half ? -x[d + half] : x[d - half];
  return round_to<T>(x[d] * c + partner * s);
}

// V values of T in 16 bytes: one vector load (the caller checked alignment).
template <typename T>
struct Vec {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
  __device__ static void load(const T* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = to_float(v[i]);
  }
};

// The last split block of a (row, head) to finish combines its `active` splits: partial results
// in `part`, per split [output (head_dim) | max score | sum of exp]; read through L2 (__ldcg),
// as other blocks wrote them.
template <typename T>
__device__ void combine_splits(const AttentionArgs& a, int64_t b, int64_t h, int64_t active) {
  const int D = static_cast<int>(a.head_dim);
  const float* part = a.partial + (b * a.heads + h) * a.splits * (a.head_dim + 2);
  float m = -INFINITY;
  for (int64_t s = 0; s < active; ++s)
    if (__ldcg(part + s * (D + 2) + D + 1) > 0.f) m = fmaxf(m, __ldcg(part + s * (D + 2) + D));
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.f, l = 0.f;
    for (int64_t s = 0; s < active; ++s) {
      const float* p = part + s * (D + 2);
      const float ls = __ldcg(p + D + 1);
      if (ls <= 0.f) continue;
      const float w = expf(__ldcg(p + D) - m);
      o += w * __ldcg(p + d);
      l += w * ls;
    }
    // A head whose every slot is masked has l = 0: NaN, as the TorchScript step's softmax gives.
    static_cast<T*>(a.out)[b * a.out_stride + h * D + d] = from_float<T>(o / l);
  }
}

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

// One block: scores of slots [start, end) of row b's head h, their softmax within the chunk and
// its share of P V, into part ([output | max | sum]).
template <typename T>
__device__ void score_chunk(const AttentionArgs& a, int64_t b, int64_t h, int64_t start, int64_t end, int64_t len,
                            float* part) {
  constexpr int W = Vec<T>::kWidth;
  __shared__ float q[kMaxHeadDim], k_new[kMaxHeadDim], v_new[kMaxHeadDim], q_rot[kMaxHeadDim], k_rot[kMaxHeadDim];
  __shared__ float scratch[kThreads / 32];
  __shared__ float sums[kThreads * W];  // the slot groups' partial outputs
  extern __shared__ float scores[];     // chunk floats (+ chunk x segments partial dots)
  const int D = static_cast<int>(a.head_dim);
  const T* row = static_cast<const T*>(a.qkv) + b * a.qkv_stride + h * 3 * a.head_dim;
  const T* row_bias = static_cast<const T*>(a.qkv_bias) + h * 3 * a.head_dim;
  for (int d = threadIdx.x; d < D; d += kThreads) {  // + the product's bias, rounded as the step's y
    q[d] = round_to<T>(to_float(row[d]) + to_float(row_bias[d]));
    k_new[d] = round_to<T>(to_float(row[D + d]) + to_float(row_bias[D + d]));
    v_new[d] = round_to<T>(to_float(row[2 * D + d]) + to_float(row_bias[2 * D + d]));
  }
  __syncthreads();
  const float position = static_cast<float>(a.positions[b * a.positions_stride]);
  for (int d = threadIdx.x; d < D; d += kThreads) {
    q_rot[d] = rotate<T>(q, d, a.rotary_ndims, a.rotary_base, position);
    k_rot[d] = rotate<T>(k_new, d, a.rotary_ndims, a.rotary_base, position);
  }
  __syncthreads();
  const int64_t head_base = ((b * a.heads + h) * a.capacity) * a.head_dim;
  T* keys = static_cast<T*>(a.keys) + head_base;
  T* values = static_cast<T*>(a.values) + head_base;
  const bool owns_new = start <= len && len < end;
  if (owns_new) {  // the one block that holds the new slot writes it; no other block reads it
    for (int d = threadIdx.x; d < D; d += kThreads) {
      keys[len * D + d] = from_float<T>(k_rot[d]);
      values[len * D + d] = from_float<T>(v_new[d]);
    }
  }
  const T* bias = a.slot_bias ? static_cast<const T*>(a.slot_bias) + (b * a.heads + h) * a.capacity : nullptr;
  float local_max = -INFINITY;
  if (a.vectorized) {
    // Partial dot products of 16 bytes of a key each: the chunk's keys are one contiguous block,
    // read by consecutive threads (coalesced, and no load waits on another), then summed per slot.
    const int segments = D / W, n = static_cast<int>(end - start) * segments;
    float* dots = scores + a.chunk;  // [slot - start][segment]
#pragma unroll 4
    for (int v = threadIdx.x; v < n; v += kThreads) {
      const int64_t j = start + v / segments;
      const int d0 = (v % segments) * W;
      float k[W];
      if (j == len) {
#pragma unroll
        for (int i = 0; i < W; ++i) k[i] = k_rot[d0 + i];
      } else {
        Vec<T>::load(keys + j * D + d0, k);
      }
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < W; ++i) dot += q_rot[d0 + i] * k[i];
      dots[v] = dot;
    }
    __syncthreads();
    for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
      float dot = 0.f;
      for (int seg = 0; seg < segments; ++seg) dot += dots[(j - start) * segments + seg];
      float score = dot * a.scale;
      if (bias) score += to_float(bias[j]);  // every slot, the new one too (the contract's slot_bias)
      scores[j - start] = score;
      local_max = fmaxf(local_max, score);
    }
  } else {
    for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
      float dot = 0.f;
      const T* kj = keys + j * D;
      if (j == len) {
        for (int d = 0; d < D; ++d) dot += q_rot[d] * k_rot[d];
      } else {
        for (int d = 0; d < D; ++d) dot += q_rot[d] * to_float(kj[d]);
      }
      float score = dot * a.scale;
      if (bias) score += to_float(bias[j]);
      scores[j - start] = score;
      local_max = fmaxf(local_max, score);
    }
  }
  const float m = block_max<kThreads>(local_max, scratch);
  float local_sum = 0.f;
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const float p = m == -INFINITY ? 0.f : expf(scores[j - start] - m);
    scores[j - start] = p;
    local_sum += p;
  }
  const float l = block_sum<kThreads>(local_sum, scratch);  // its __syncthreads also publishes scores
  // P V: a head's dims in `segments` of `width` values (one vector load each); thread
  // (g, seg) sums the slots j = start + g, start + g + groups, ... of its segment.
  const int width = a.vectorized ? W : 1, segments = D / width;
  if (segments > kThreads) {  // wide heads, scalar loads: each thread sums whole dims
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float o = 0.f;
      for (int64_t j = start; j < end; ++j) o += scores[j - start] * (j == len ? v_new[d] : to_float(values[j * D + d]));
      part[d] = o;
    }
  } else {
    const int groups = kThreads / segments, g = threadIdx.x / segments, seg = threadIdx.x % segments;
    float acc[W];
#pragma unroll
    for (int i = 0; i < W; ++i) acc[i] = 0.f;
    if (g < groups) {
      const int d0 = seg * width;
#pragma unroll 4
      for (int64_t j = start + g; j < end; j += groups) {
        const float p = scores[j - start];
        if (j == len) {
#pragma unroll
          for (int i = 0; i < W; ++i)
            if (i < width) acc[i] += p * v_new[d0 + i];
        } else if (a.vectorized) {
          float v[W];
          Vec<T>::load(values + j * D + d0, v);
#pragma unroll
          for (int i = 0; i < W; ++i) acc[i] += p * v[i];
        } else {
          acc[0] += p * to_float(values[j * D + d0]);
        }
      }
#pragma unroll
      for (int i = 0; i < W; ++i)
        if (i < width) sums[g * D + d0 + i] = acc[i];  // groups * D <= kThreads * W
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float o = 0.f;
      for (int gg = 0; gg < groups; ++gg) o += sums[gg * D + d];
      part[d] = o;
    }
  }
  if (threadIdx.x == 0) {
    part[D] = m;
    part[D + 1] = l;
  }
}

// One block of a gemv: y[r, j] = x[r, :] . w[j, :] for `Rows` rows over Warps warps, `Split`
// warps per output j (each over a contiguous 1/Split of k, summed in shared memory in a fixed
// order): one warp per output leaves too few warps for a card's multiprocessors when n is small.
// Each lane reads 16 bytes of w's row at a time (a warp: 512 contiguous bytes) and the matching
// values of x. Sums in float32, rounded as the unfused step rounds (GemvArgs). With layer_norm,
// the block first normalises x's rows into shared memory (the LayerNorm kernel's arithmetic,
// rounded to T as its output is) and multiplies those.
template <typename T, int Rows, int Split, int Warps>
__device__ void gemv_block(const GemvArgs& g, int64_t block) {
  constexpr int W = Vec<T>::kWidth, kBlockThreads = Warps * 32;
  constexpr int kOutputs = Warps / Split;
  extern __shared__ __align__(16) unsigned char gemv_shared[];  // Rows * k values of T (layer_norm)
  __shared__ float partial_sums[Warps * Rows];
  __shared__ float scratch[Warps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % Split;
  const int64_t j = block * kOutputs + warp / Split, k = g.k;
  const T* x = static_cast<const T*>(g.x);
  int64_t x_stride = g.x_stride;
  if (g.layer_norm) {  // the whole block, before any warp may leave
    T* normed = reinterpret_cast<T*>(gemv_shared);
    const T* gamma = static_cast<const T*>(g.gamma);
    const T* beta = static_cast<const T*>(g.beta);
    for (int r = 0; r < Rows; ++r) {
      const T* xr = x + r * x_stride;
      float sum = 0.f;
      for (int64_t c = threadIdx.x; c < k; c += kBlockThreads) sum += to_float(xr[c]);
      const float mean = block_sum<kBlockThreads>(sum, scratch) / static_cast<float>(k);
      float sq = 0.f;
      for (int64_t c = threadIdx.x; c < k; c += kBlockThreads) {
        const float d = to_float(xr[c]) - mean;
        sq += d * d;
      }
      const float rstd = rsqrtf(block_sum<kBlockThreads>(sq, scratch) / static_cast<float>(k) + g.eps);
      for (int64_t c = threadIdx.x; c < k; c += kBlockThreads) {
        float v = (to_float(xr[c]) - mean) * rstd;
        if (gamma) v = v * to_float(gamma[c]);
        if (beta) v = v + to_float(beta[c]);
        normed[r * k + c] = from_float<T>(v);
      }
    }
    __syncthreads();
    x = normed;
    x_stride = k;
  }
  float acc[Rows];
#pragma unroll
  for (int r = 0; r < Rows; ++r) acc[r] = 0.f;
  if (j < g.n) {
    const int64_t per_part = (k / W + Split - 1) / Split * W;  // whole 16-byte loads
    const int64_t c_end = min(k, (part + 1) * per_part);
    const T* wj = static_cast<const T*>(g.w) + j * (g.w_stride > 0 ? g.w_stride : k);
#pragma unroll 4
    for (int64_t c = part * per_part + static_cast<int64_t>(lane) * W; c < c_end; c += 32 * W) {
      float wv[W];
      Vec<T>::load(wj + c, wv);
#pragma unroll
      for (int r = 0; r < Rows; ++r) {
        float xv[W];
        Vec<T>::load(x + r * x_stride + c, xv);
#pragma unroll
        for (int i = 0; i < W; ++i) acc[r] += wv[i] * xv[i];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < Rows; ++r) acc[r] = warp_sum(acc[r]);
  if (Split > 1) {
    if (lane == 0)
      for (int r = 0; r < Rows; ++r) partial_sums[warp * Rows + r] = acc[r];
    __syncthreads();
    if (part != 0) return;
    for (int r = 0; r < Rows; ++r) {
      float v = 0.f;
      for (int q = 0; q < Split; ++q) v += partial_sums[(warp + q) * Rows + r];
      acc[r] = v;
    }
  }
  if (lane != 0 || j >= g.n) return;
  const T* bias = static_cast<const T*>(g.bias);
  for (int r = 0; r < Rows; ++r) {
    float v = acc[r];
    if (g.addend) v += g.addend[r * g.addend_stride + j];
    if (g.sums) {
      g.sums[r * g.sums_stride + j] = v;
      continue;
    }
    if (g.gelu_from >= 0 && j >= g.gelu_from) {
      const int64_t c = j - g.gelu_from;
      const float in = round_to<T>(round_to<T>(v) + to_float(static_cast<const T*>(g.gelu_bias)[c]));
      static_cast<T*>(g.gelu_out)[r * g.gelu_stride + c] = from_float<T>(gelu(in));
      continue;
    }
    T* out = static_cast<T*>(g.y) + r * g.y_stride + j;
    if (g.accumulate) v += to_float(*out);
    if (bias) v = round_to<T>(v) + to_float(bias[j]);
    *out = from_float<T>(v);
  }
}

// A gemv launch: 256 threads = 8 warps per block.
template <typename T, int Rows, int Split>
__global__ void __launch_bounds__(256) gemv_kernel(GemvArgs g) {
  wait_for_previous_kernel();
  gemv_block<T, Rows, Split, 8>(g, blockIdx.x);
}

// One launch per layer. Blocks [0, rows * heads * splits): one block scores one chunk of one
// row's head, and the last of a head's splits to finish combines them (a counter per head,
// reset by that block for the next launch): no second kernel and no gap between the two.
// Blocks after those either apply GELU to the carry (SideRows == 0) or compute the side
// product (a gemv of SideRows rows, SideSplit warps per output), whose weight streaming then
// overlaps the attention's latency; the attention's blocks come first, so they start first.
template <typename T, int SideRows, int SideSplit>
__global__ void __launch_bounds__(kThreads) split_attention(AttentionArgs a) {
  __shared__ bool last;
  const int64_t attention_blocks = a.rows * a.heads * a.splits;
  if (static_cast<int64_t>(blockIdx.x) >= attention_blocks) {
    const int64_t block = static_cast<int64_t>(blockIdx.x) - attention_blocks;
    wait_for_previous_kernel();
    if constexpr (SideRows > 0) {
      gemv_block<T, SideRows, SideSplit, kThreads / 32>(a.side_product, block);
    } else {  // GELU of the MLP's input
      const int64_t e = block * kThreads + threadIdx.x;
      if (!a.carry || e >= a.rows * a.carry_cols) return;
      const int64_t b = e / a.carry_cols, c = e % a.carry_cols;
      const float x = round_to<T>(to_float(static_cast<const T*>(a.carry)[b * a.qkv_stride + c]) +
                                  to_float(static_cast<const T*>(a.carry_bias)[c]));
      static_cast<T*>(a.carry_out)[b * a.out_stride + c] = from_float<T>(gelu(x));
    }
    return;
  }
  const int64_t head = blockIdx.x / a.splits, s = blockIdx.x % a.splits, h = head % a.heads, b = head / a.heads;
  // The step's inputs, written before it starts (no kernel of the step writes them): read
  // before the wait.
  const int64_t len = a.lengths[b * a.lengths_stride];  // the new token goes to slot len
  if (len < 0 || len >= a.capacity) {  // the caller's bug: stop loudly, as an index check would
    if (threadIdx.x == 0 && s == 0)
      printf("kvcompress native step: row %lld holds %lld of its %lld slots: no room for the new token\n",
             static_cast<long long>(b), static_cast<long long>(len), static_cast<long long>(a.capacity));
    __trap();
  }
  // Splits past slot len hold nothing of this row: a cache sized for a long prompt and
  // compressed since leaves most of the grid with nothing to do, so those blocks leave at once.
  const int64_t active = len / a.chunk + 1, start = s * a.chunk, end = min(start + a.chunk, len + 1);
  if (s >= active) return;
  if (a.prefetch) {  // this block's older slots (no kernel of the step writes them) into L2
    const int64_t bytes = (min(end, len) - start) * a.head_dim * static_cast<int64_t>(sizeof(T));
    const int64_t offset = ((b * a.heads + h) * a.capacity + start) * a.head_dim;
    for (int64_t at = static_cast<int64_t>(threadIdx.x) * 128; at < bytes; at += kThreads * 128) {
      prefetch_l2(reinterpret_cast<const char*>(static_cast<const T*>(a.keys) + offset) + at);
      prefetch_l2(reinterpret_cast<const char*>(static_cast<const T*>(a.values) + offset) + at);
    }
  }
  wait_for_previous_kernel();
  float* part = a.partial + ((b * a.heads + h) * a.splits + s) * (a.head_dim + 2);
  score_chunk<T>(a, b, h, start, end, len, part);
  // Every thread's writes visible device-wide before the count that may let another block read them.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(a.counters + head, 1) == static_cast<int>(active) - 1;
    if (last) a.counters[head] = 0;  // ready for the next launch (every active split has counted)
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  combine_splits<T>(a, b, h, active);
}

// LayerNorm threads per row, and the widest row kept in shared memory: a block's static and
// dynamic shared memory together stay within the 48 KiB a launch gets without opting in.
constexpr int kNormThreads = 512;
constexpr int64_t kMaxCachedCols = (48 * 1024) / static_cast<int64_t>(sizeof(float)) - kNormThreads / 32;

// grid rows: x += pending; out = LayerNorm(x) (* gamma + beta). A row is read from global memory
// once (kept in shared memory up to kMaxCachedCols values) by many threads: at one row per block, a few
// threads walking the row three times left the step's one-row LayerNorm latency-bound.
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    add_and_layer_norm_kernel(T* __restrict__ x, const T* __restrict__ pending, T* __restrict__ out,
                              const T* __restrict__ gamma, const T* __restrict__ beta, int64_t cols, float eps) {
  extern __shared__ float cached_row[];  // cols floats when cols <= kMaxCachedCols, else unused
  __shared__ float scratch[kNormThreads / 32];
  const bool cached = cols <= kMaxCachedCols;
  T* xr = x + blockIdx.x * cols;
  T* outr = out + blockIdx.x * cols;
  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += kNormThreads) {
    float v = to_float(xr[c]);
    if (pending) {
      v = round_to<T>(v + to_float(pending[c]));
      xr[c] = from_float<T>(v);
    }
    if (cached) cached_row[c] = v;
    sum += v;
  }
  // Each thread reads back only what it wrote itself (same c): no barrier needed before it.
  const float mean = block_sum<kNormThreads>(sum, scratch) / static_cast<float>(cols);
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += kNormThreads) {
    const float dv = (cached ? cached_row[c] : to_float(xr[c])) - mean;
    sq += dv * dv;
  }
  const float rstd = rsqrtf(block_sum<kNormThreads>(sq, scratch) / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += kNormThreads) {
    float v = ((cached ? cached_row[c] : to_float(xr[c])) - mean) * rstd;
    if (gamma) v = v * to_float(gamma[c]);
    if (beta) v = v + to_float(beta[c]);
    outr[c] = from_float<T>(v);
  }
}

// Shared memory a gemv block may use for its LayerNorm'd input rows without opting in (48 KiB
// less the kernel's static arrays).
constexpr int64_t kGemvSharedBytes = 48 * 1024 - 1024;

// What the launches ask of the current device, queried once per device (not at every launch):
// the warps its multiprocessors hold at full occupancy, and whether it takes programmatic
// dependent launches (sm_90 and later). Zeros where a query fails.
struct DeviceFacts {
  int warps = 0;
  bool early_launch = false;
};
const DeviceFacts& device_facts() {
  constexpr int kDevices = 64;
  static DeviceFacts facts[kDevices];
  static std::once_flag queried[kDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) {
    static const DeviceFacts none;
    return none;
  }
  std::call_once(queried[device], [device] {
    int sms = 0, threads = 0, major = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device) == cudaSuccess)
      facts[device].warps = sms * threads / 32;
    facts[device].early_launch =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
  });
  return facts[device];
}

// kernel<<<grid, threads, shared, stream>>>(args...), launched early (AttentionArgs::early_launch)
// where asked and the device and the CUDA runtime take it.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, size_t shared, cudaStream_t stream, bool early,
            Args&&... args) {
#if CUDART_VERSION >= 11080
  if (early && device_facts().early_launch) {
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
    cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);  // an error is left for last_error()
    return;
  }
#endif
  kernel<<<grid, threads, shared, stream>>>(std::forward<Args>(args)...);
}

template <typename T, int Split>
bool launch_gemv_split(const GemvArgs& g, unsigned grid, size_t shared, cudaStream_t stream) {
  switch (g.rows) {
#define KVC_GEMV_ROWS(R)                                          \
  case R:                                                        \
    launch(gemv_kernel<T, R, Split>, grid, 256, shared, stream, g.early_launch, g); \
    return true;
    KVC_GEMV_ROWS(1)
    KVC_GEMV_ROWS(2)
    KVC_GEMV_ROWS(3)
    KVC_GEMV_ROWS(4)
    KVC_GEMV_ROWS(5)
    KVC_GEMV_ROWS(6)
    KVC_GEMV_ROWS(7)
    KVC_GEMV_ROWS(8)
#undef KVC_GEMV_ROWS
    default:
      return false;
  }
}

// Warps per output: enough warps for every multiprocessor's full occupancy, at most 4.
int gemv_split(int64_t n) {
  const int warps_per_card = device_facts().warps;
  int split = 1;
  while (split < 4 && n * split * 2 <= warps_per_card) split *= 2;
  return split;
}

template <typename T>
bool launch_gemv(const GemvArgs& g, cudaStream_t stream) {
  const int split = gemv_split(g.n);
  const int64_t outputs_per_block = 8 / split;
  const unsigned grid = static_cast<unsigned>((g.n + outputs_per_block - 1) / outputs_per_block);
  const size_t shared = g.layer_norm ? static_cast<size_t>(g.rows * g.k) * sizeof(T) : 0;
  switch (split) {
    case 1: return launch_gemv_split<T, 1>(g, grid, shared, stream);
    case 2: return launch_gemv_split<T, 2>(g, grid, shared, stream);
    default: return launch_gemv_split<T, 4>(g, grid, shared, stream);
  }
}

// Blocks of the side product's gemv in the attention's grid: kThreads / 32 warps a block.
template <typename T, int Split>
bool launch_attention_with_side(const AttentionArgs& a, int64_t attention_blocks, size_t shared, cudaStream_t stream) {
  const int64_t outputs_per_block = (kThreads / 32) / Split;
  const int64_t blocks = attention_blocks + (a.side_product.n + outputs_per_block - 1) / outputs_per_block;
  if (blocks > std::numeric_limits<int32_t>::max()) return false;
  const unsigned grid = static_cast<unsigned>(blocks);
  switch (a.side_product.rows) {
#define KVC_SIDE_ROWS(R)                                                     \
  case R:                                                                   \
    launch(split_attention<T, R, Split>, grid, kThreads, shared, stream, a.early_launch, a); \
    return true;
    KVC_SIDE_ROWS(1)
    KVC_SIDE_ROWS(2)
    KVC_SIDE_ROWS(3)
    KVC_SIDE_ROWS(4)
    KVC_SIDE_ROWS(5)
    KVC_SIDE_ROWS(6)
    KVC_SIDE_ROWS(7)
    KVC_SIDE_ROWS(8)
#undef KVC_SIDE_ROWS
    default:
      return false;
  }
}

// Dynamic shared memory of an attention block: the chunk's scores, and its keys' partial dot
// products when vectorized; at most kAttentionSharedBytes (48 KiB less the static arrays).
constexpr int64_t kAttentionSharedBytes = 36 * 1024;
int64_t attention_shared_bytes(int64_t element_size, int64_t head_dim, int64_t chunk, bool vectorized) {
  const int64_t segments = vectorized ? head_dim / (16 / element_size) : 0;
  return chunk * (1 + segments) * static_cast<int64_t>(sizeof(float));
}

template <typename T>
bool launch_attention(const AttentionArgs& a, cudaStream_t stream) {
  const int64_t attention_blocks = a.rows * a.heads * a.splits;
  const int64_t bytes = attention_shared_bytes(sizeof(T), a.head_dim, a.chunk, a.vectorized);
  if (a.chunk < 1 || bytes > kAttentionSharedBytes) return false;
  const size_t shared = static_cast<size_t>(bytes);
  if (!a.has_side_product) {
    const int64_t gelu_blocks = a.carry ? (a.rows * a.carry_cols + kThreads - 1) / kThreads : 0;
    if (attention_blocks + gelu_blocks > std::numeric_limits<int32_t>::max()) return false;
    launch(split_attention<T, 0, 1>, static_cast<unsigned>(attention_blocks + gelu_blocks), kThreads, shared, stream,
           a.early_launch, a);
    return true;
  }
  const GemvArgs& g = a.side_product;
  if (g.layer_norm || g.dtype != a.dtype || g.n < 1 || g.n > (int64_t{1} << 31) || !gemv_fits(g.dtype, g.rows, g.k, false))
    return false;
  switch (gemv_split(g.n)) {
    case 1: return launch_attention_with_side<T, 1>(a, attention_blocks, shared, stream);
    case 2: return launch_attention_with_side<T, 2>(a, attention_blocks, shared, stream);
    default: return launch_attention_with_side<T, 4>(a, attention_blocks, shared, stream);
  }
}

}  // namespace

bool attention_fits(DType dtype, int64_t head_dim, int64_t chunk) {
  const int64_t size = dtype == DType::f32 ? 4 : 2;
  return chunk >= 1 && attention_shared_bytes(size, head_dim, chunk, true) <= kAttentionSharedBytes;
}

bool decode_attention(const AttentionArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::f32: return launch_attention<float>(args, stream);
    case DType::f16: return launch_attention<__half>(args, stream);
    case DType::bf16: return launch_attention<__nv_bfloat16>(args, stream);
  }
  return false;
}

void add_and_layer_norm(DType dtype, void* x, const void* pending, void* out, const void* gamma, const void* beta,
                        int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(rows);
  const size_t shared = cols <= kMaxCachedCols ? static_cast<size_t>(cols) * sizeof(float) : 0;
  switch (dtype) {
    case DType::f32:
      return add_and_layer_norm_kernel<float><<<grid, kNormThreads, shared, stream>>>(
          static_cast<float*>(x), static_cast<const float*>(pending), static_cast<float*>(out),
          static_cast<const float*>(gamma), static_cast<const float*>(beta), cols, eps);
    case DType::f16:
      return add_and_layer_norm_kernel<__half><<<grid, kNormThreads, shared, stream>>>(
          static_cast<__half*>(x), static_cast<const __half*>(pending), static_cast<__half*>(out),
          static_cast<const __half*>(gamma), static_cast<const __half*>(beta), cols, eps);
    case DType::bf16:
      return add_and_layer_norm_kernel<__nv_bfloat16><<<grid, kNormThreads, shared, stream>>>(
          static_cast<__nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(pending),
          static_cast<__nv_bfloat16*>(out), static_cast<const __nv_bfloat16*>(gamma),
          static_cast<const __nv_bfloat16*>(beta), cols, eps);
  }
}

bool gemv_fits(DType dtype, int64_t rows, int64_t k, bool layer_norm) {
  const int64_t size = dtype == DType::f32 ? 4 : 2;
  return rows >= 1 && rows <= kMaxGemvRows && k >= 1 && k % (16 / size) == 0 &&
         (!layer_norm || rows * k * size <= kGemvSharedBytes);
}

bool gemv(const GemvArgs& g, cudaStream_t stream) {
  if (g.n < 1 || g.n > (int64_t{1} << 31) || !gemv_fits(g.dtype, g.rows, g.k, g.layer_norm)) return false;
  switch (g.dtype) {
    case DType::f32: return launch_gemv<float>(g, stream);
    case DType::f16: return launch_gemv<__half>(g, stream);
    case DType::bf16: return launch_gemv<__nv_bfloat16>(g, stream);
  }
  return false;
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace kernels
}  // namespace runtime
}  // namespace kvcompress
