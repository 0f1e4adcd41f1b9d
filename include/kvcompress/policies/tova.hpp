#pragma once
// TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): when the cache exceeds its size,
// keep the tokens the last query attends to most. The paper averages the attention over a
// layer's heads (one choice per layer); `heads=per_head` lets every head choose for itself.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

enum class TOVAHeads { mean, per_head };

struct TOVAOptions {
  int64_t cache_size = 512;
  TOVAHeads heads = TOVAHeads::mean;
};

namespace policies {

struct TOVA {
  using Options = TOVAOptions;
  static constexpr const char* name = "tova";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("cache_size", o.cache_size, 1);
    v.choice("heads", o.heads, {{"mean", TOVAHeads::mean}, {"per_head", TOVAHeads::per_head}});
  }

  static Needs needs(const Options&) {
    Needs n;
    n.queries = 1;
    return n;
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    if (layer.seq() <= o.cache_size) return std::nullopt;
    const at::Tensor last = window_attention(layer).select(2, -1);  // [batch, heads, seq]
    Selection s;
    s.keep_indices(o.heads == TOVAHeads::mean ? top_k_positions_shared_by_heads(last, o.cache_size, 0)
                                               : top_k_positions(last, o.cache_size, 0, /*largest=*/true));
    return s;
  }

  /// select()'s ranking, for per-head budgets (AdaKV<TOVA>): the last query's attention (with
  /// heads=mean its sum over heads, the same in every head).
  static std::optional<HeadScores> head_scores(const Options& o, const LayerView& layer) {
    if (layer.seq() <= o.cache_size) return std::nullopt;
    at::Tensor last = window_attention(layer).select(2, -1);
    if (o.heads == TOVAHeads::mean) last = last.sum(1, /*keepdim=*/true).expand_as(last).contiguous();
    return HeadScores{last, o.cache_size};
  }
};

}  // namespace policies
}  // namespace kvcompress
