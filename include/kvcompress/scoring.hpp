#pragma once
// Scores and the one top-k every norm-based policy shares.
#include <kvcompress/types.hpp>

namespace kvcompress {

/// The dtype scores are computed in: float32 for half-precision caches (LibTorch 1.13's CPU
/// sort/avg_pool1d lack half kernels), the cache's own dtype otherwise.
inline at::ScalarType score_dtype(at::ScalarType cache_dtype) {
  return (cache_dtype == at::kHalf || cache_dtype == at::kBFloat16) ? at::kFloat : cache_dtype;
}

/// L2 norm of every key over head_dim for positions [start, start + length): [batch, heads, length].
inline at::Tensor key_norms(const at::Tensor& keys, int64_t start, int64_t length) {
  at::Tensor k = keys.narrow(2, start, length);
  if (k.scalar_type() != score_dtype(k.scalar_type())) k = k.to(score_dtype(k.scalar_type()));
  return at::norm(k, 2, {-1});
}

/// Chooses `k` positions per (row, head) from `scores` ([batch, heads, n], covering positions
/// offset .. offset + n - 1): the `k` smallest (or largest) scores, then re-sorted ascending by
/// position. A stable sort makes ties keep the earlier position, as a stable argsort would.
inline at::Tensor top_k_positions(const at::Tensor& scores, int64_t k, int64_t offset, bool largest) {
  at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/largest));
  at::Tensor chosen = std::get<0>(order.narrow(-1, 0, k).sort(-1));
  return offset == 0 ? chosen : chosen.add_(offset);
}

/// The `k` smallest-norm positions of [start, start + length), ascending.
inline at::Tensor smallest_norm_positions(const at::Tensor& keys, int64_t start, int64_t length,
                                          int64_t k) {
  return top_k_positions(key_norms(keys, start, length), k, start, /*largest=*/false);
}

}  // namespace kvcompress
