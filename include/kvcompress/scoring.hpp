#pragma once
// Scores and the one top-k every norm-based policy shares.
#include <kvcompress/types.hpp>

#include <cmath>
#include <limits>

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

/// What a scoring policy ranks one layer's slots by, for wrappers that choose the tokens
/// themselves (per-head budgets, policies/adakv.hpp): larger = keep, +inf = a slot the policy
/// always keeps (sinks, its recent window). The policy keeps `per_head` slots per head.
struct HeadScores {
  at::Tensor scores;  ///< floating point [batch, heads, seq]
  int64_t per_head;   ///< slots the policy keeps in every head, < seq
};

/// Chooses `k` positions per (row, head) from `scores` ([batch, heads, n], covering positions
/// offset .. offset + n - 1): the `k` smallest (or largest) scores, then re-sorted ascending by
/// position. A stable sort makes ties keep the earlier position, as a stable argsort would.
inline at::Tensor top_k_positions(const at::Tensor& scores, int64_t k, int64_t offset, bool largest) {
  at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/largest));
  at::Tensor chosen = std::get<0>(order.narrow(-1, 0, k).sort(-1));
  return offset == 0 ? chosen : chosen.add_(offset);
}

/// The `k` largest scores of `scores` ([batch, heads, n] for positions offset .. offset + n - 1)
/// summed over heads: one choice per row, the same for every head ([batch, heads, k]).
inline at::Tensor top_k_positions_shared_by_heads(const at::Tensor& scores, int64_t k, int64_t offset) {
  const at::Tensor chosen = top_k_positions(scores.sum(1, /*keepdim=*/true), k, offset, /*largest=*/true);
  return chosen.expand({scores.size(0), scores.size(1), k});
}

/// What the last W queries attend to: softmax(q k^T / sqrt(head_dim)) over the slots, each
/// query seeing only the slots whose original position is at most its own (so a query never
/// sees a token that came after it) nor a hidden slot (LayerView::hidden). float32 (float64 for
/// float64 caches) [batch, heads, W, seq]. Needs layer.queries, query_positions and key_positions.
inline at::Tensor window_attention(const LayerView& layer) {
  const at::ScalarType dtype = score_dtype(layer.keys.scalar_type());
  const at::Tensor q = layer.queries.to(dtype), k = layer.keys.to(dtype);
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2)).div_(std::sqrt(static_cast<double>(k.size(-1))));
  const at::Tensor query_pos = layer.query_positions.to(layer.keys.device()).view({1, 1, -1, 1});
  at::Tensor hidden = layer.key_positions.unsqueeze(2).gt(query_pos);
  if (layer.hidden.defined()) hidden = hidden.logical_or(layer.hidden.unsqueeze(2));
  scores.masked_fill_(hidden, -std::numeric_limits<double>::infinity());
  at::Tensor probs = at::softmax(scores, -1);
  return probs.masked_fill_(probs.isnan(), 0.0);  // a query that sees no slot attends to nothing
}

/// The `k` smallest-norm positions of [start, start + length), ascending.
inline at::Tensor smallest_norm_positions(const at::Tensor& keys, int64_t start, int64_t length,
                                          int64_t k) {
  return top_k_positions(key_norms(keys, start, length), k, start, /*largest=*/false);
}

}  // namespace kvcompress
