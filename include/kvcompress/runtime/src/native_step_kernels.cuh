#pragma once
// The native decode step's CUDA kernels (native_step_kernels.cu), declared without ATen: raw
// pointers, one CUDA stream. native_step.cpp is the only caller; it checks every shape first.
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvcompress {
namespace runtime {
namespace kernels {

enum class DType { f32, f16, bf16 };

/// y[r, :] = x[r, :] . w^T for 1 to kMaxGemvRows rows: a weight-streaming matrix-vector
/// product for the decode step's small batches, with the step's neighbours fused in:
///   layer_norm: x's rows normalised first (LayerNorm over k, eps; * gamma + beta when given),
///               as add_and_layer_norm computes `out` (no pending);
///   addend:     float32 sums of the same outputs over other columns of k (another product's
///               `sums`) added to the sum;
///   accumulate: y's old value added before the one rounding (a GEMM with beta = 1);
///   bias:       then bias[j] added and rounded again (the next LayerNorm's pending add);
///   sums:       instead of all that, the raw float32 sum written to sums[r * sums_stride + j]
///               (the first part of a product split over k: the rest adds it as `addend`);
///   gelu_from:  outputs j >= gelu_from are the MLP's input: GELU(round(round(sum) +
///               gelu_bias[j - gelu_from])) written to gelu_out[r * gelu_stride + j - gelu_from]
///               instead of y (the attention kernel's carry arithmetic, fused into the product).
/// w is [n, k] with row stride w_stride (k when 0); x and w must allow 16-byte loads (x_stride
/// and w_stride multiples of 16 / element size, both pointers 16-byte aligned: the caller
/// checks); y is written one value at a time.
constexpr int64_t kMaxGemvRows = 8;
struct GemvArgs {
  DType dtype = DType::f16;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* w = nullptr;
  int64_t w_stride = 0;
  int64_t rows = 0, n = 0, k = 0;
  void* y = nullptr;
  int64_t y_stride = 0;
  bool accumulate = false;
  const void* bias = nullptr;  ///< n values, optional
  bool layer_norm = false;
  const void* gamma = nullptr;  ///< k values, optional (layer_norm)
  const void* beta = nullptr;   ///< k values, optional (layer_norm)
  float eps = 1e-5f;
  const float* addend = nullptr;  ///< optional [rows, n] float32, row stride addend_stride
  int64_t addend_stride = 0;
  float* sums = nullptr;  ///< optional [rows, n] float32, row stride sums_stride
  int64_t sums_stride = 0;
  int64_t gelu_from = -1;  ///< < 0: no GELU outputs
  const void* gelu_bias = nullptr;  ///< n - gelu_from values
  void* gelu_out = nullptr;
  int64_t gelu_stride = 0;
  bool early_launch = false;  ///< see AttentionArgs::early_launch
};

/// One layer's decode attention for one new token per row in one launch, split over the cache
/// length (FlashDecoding): rotary on the new query and key, the new key and value written in
/// place at slot lengths[b], attention over slots [0, lengths[b]], the splits that hold those
/// slots combined by the last of them to finish; the grid covers the capacity, and blocks of
/// splits past a row's length leave at once (a length outside [0, capacity) stops the kernel
/// with a device-side trap, as an index check would). lengths are an input of the step: no
/// kernel before the attention in the same step may write them. Blocks after the attention's,
/// in the same grid, do one of two things:
///   carry:        GELU of the MLP's input written beside the attention output, so that the
///                 layer's second product reads one contiguous row [o | gelu(carry)];
///   side_product: a gemv (no layer_norm) that does not read the attention's output -- the
///                 MLP's output product, whose weights then stream while the attention, bound
///                 by latency rather than by bandwidth, runs.
struct AttentionArgs {
  DType dtype = DType::f16;
  int64_t rows = 0, heads = 0, head_dim = 0, capacity = 0;
  const void* qkv = nullptr;  ///< [rows, *] row stride qkv_stride; per head [q | k | v] (GPT-NeoX layout)
  int64_t qkv_stride = 0;
  const void* qkv_bias = nullptr;  ///< the product's bias for those columns (added here, rounded to the dtype)
  void* keys = nullptr;    ///< [rows, heads, capacity, head_dim], contiguous
  void* values = nullptr;  ///< same
  bool vectorized = false;  ///< rows of keys/values in whole 16-byte loads (head_dim * size % 16 == 0, aligned)
  const int64_t* lengths = nullptr;  ///< valid slots of row b at lengths[b * lengths_stride]
  int64_t lengths_stride = 0;
  const int64_t* positions = nullptr;  ///< position of row b's new token at positions[b * positions_stride]
  int64_t positions_stride = 0;
  int64_t rotary_ndims = 0;
  float rotary_base = 10000.f;
  float scale = 1.f;
  const void* slot_bias = nullptr;  ///< optional [rows, heads, capacity], added to every slot's score
  int64_t splits = 1, chunk = 1;    ///< splits * chunk >= capacity
  float* partial = nullptr;         ///< workspace: rows * heads * splits * (head_dim + 2) floats
  int* counters = nullptr;  ///< rows * heads zeros before the first launch; every launch leaves them zero
  void* out = nullptr;              ///< attention output at out[b * out_stride + h * head_dim + d]
  int64_t out_stride = 0;
  const void* carry = nullptr;  ///< optional: carry_cols inputs of the MLP per row (row stride qkv_stride)
  const void* carry_bias = nullptr;  ///< their bias (carry_cols values)
  int64_t carry_cols = 0;
  void* carry_out = nullptr;  ///< GELU(carry) at carry_out[b * out_stride + c]
  bool has_side_product = false;  ///< instead of carry: side_product's blocks
  GemvArgs side_product;
  /// Launched while the stream's previous kernel finishes (programmatic dependent launch, on
  /// sm_90 and later; a plain launch elsewhere): the blocks read only the step's inputs (lengths)
  /// and prefetch (below) before they wait for the previous kernel.
  bool early_launch = false;
  /// Each attention block's older keys and values hinted into L2 before it waits for the previous
  /// kernel (false: loaded when it gets to them). Weights are not prefetched: on an H100 that
  /// made each gemv 0.4-1.1 us slower (docs/PERFORMANCE.md).
  bool prefetch = true;
};
/// Whether a block of `chunk` slots of heads of head_dim values fits the attention's shared memory.
bool attention_fits(DType dtype, int64_t head_dim, int64_t chunk);
/// Launches the attention; false, launching nothing, where attention_fits says no, or a side
/// product does not fit (see gemv) or asks for layer_norm.
bool decode_attention(const AttentionArgs& args, cudaStream_t stream);

/// x += pending (a bias the previous product left out; optional), then
/// out = LayerNorm(x) * gamma + beta (gamma / beta optional), per row of `cols` values.
void add_and_layer_norm(DType dtype, void* x, const void* pending, void* out, const void* gamma, const void* beta,
                        int64_t rows, int64_t cols, float eps, cudaStream_t stream);

/// Whether gemv takes `rows` rows of k values (with layer_norm, they must fit its shared memory).
bool gemv_fits(DType dtype, int64_t rows, int64_t k, bool layer_norm);
/// Launches the product; false, launching nothing, where gemv_fits says no or n is outside [1, 2^31].
bool gemv(const GemvArgs& args, cudaStream_t stream);

/// The CUDA error of the last launch, as text ("" when none).
const char* last_error();

}  // namespace kernels
}  // namespace runtime
}  // namespace kvcompress
