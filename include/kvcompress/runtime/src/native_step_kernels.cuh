#pragma once
// The native decode step's CUDA kernels (native_step_kernels.cu), declared without ATen: raw
// pointers, one CUDA stream. native_step.cpp is the only caller; it checks every shape first.
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvcompress {
namespace runtime {
namespace kernels {

enum class DType { f32, f16, bf16 };

/// One layer's decode attention for one new token per row, split over the cache length
/// (FlashDecoding): rotary on the new query and key, the new key and value written in place at
/// slot lengths[b], attention over slots [0, lengths[b]], then the splits combined (a length
/// outside [0, capacity) stops the kernel with a device-side trap, as an index check would). Also writes
/// GELU of the MLP's input (the fused layer's carry) beside the attention output, so that the
/// layer's second product reads one contiguous row [o | gelu(carry)].
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
  void* out = nullptr;              ///< attention output at out[b * out_stride + h * head_dim + d]
  int64_t out_stride = 0;
  const void* carry = nullptr;  ///< optional: carry_cols inputs of the MLP per row (row stride qkv_stride)
  const void* carry_bias = nullptr;  ///< their bias (carry_cols values)
  int64_t carry_cols = 0;
  void* carry_out = nullptr;  ///< GELU(carry) at carry_out[b * out_stride + c]
};
void decode_attention(const AttentionArgs& args, cudaStream_t stream);

/// x += pending (a bias the previous product left out; optional), then
/// out = LayerNorm(x) * gamma + beta (gamma / beta optional), per row of `cols` values.
void add_and_layer_norm(DType dtype, void* x, const void* pending, void* out, const void* gamma, const void* beta,
                        int64_t rows, int64_t cols, float eps, cudaStream_t stream);

/// y[r, :] = x[r, :] . w^T (accumulate: y += ...) for 1 to kMaxGemvRows rows: a weight-
/// streaming matrix-vector product for the decode step's small batches. w is [n, k] row-major;
/// x and w must allow 16-byte loads (x_stride a multiple of 16 / element size, both pointers
/// 16-byte aligned: the caller checks); y is written one value at a time. Returns false, launching nothing, for
/// rows outside [1, kMaxGemvRows], n < 1, or k not a multiple of 16 / element size.
constexpr int64_t kMaxGemvRows = 8;
bool gemv(DType dtype, const void* x, int64_t x_stride, const void* w, int64_t rows, int64_t n, int64_t k, void* y,
          int64_t y_stride, bool accumulate, cudaStream_t stream);

/// The CUDA error of the last launch, as text ("" when none).
const char* last_error();

}  // namespace kernels
}  // namespace runtime
}  // namespace kvcompress
