#pragma once
// The course project's `h2o_attention`: H2O (Zhang et al., 2023) with accumulated attention --
// sinks, the heavy hitters of the middle by attention summed over heads (one choice shared by
// every head), and a recent window. Scores decay by `decay_factor` each step before the step's
// attention is added. Unlike the course project, scores follow their tokens through every
// compression (the runtime moves them with the keys), instead of being reset or misaligned.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct H2OAttentionOptions {
  int64_t start_size = 4;
  int64_t heavy_hitter_size = 64;
  int64_t recent_size = 444;
  double decay_factor = 0.9;
};

namespace policies {

struct H2OAttention {
  using Options = H2OAttentionOptions;
  static constexpr const char* name = "h2o_attention";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("start_size", o.start_size, 0);
    v.integer("heavy_hitter_size", o.heavy_hitter_size, 0);
    v.integer("recent_size", o.recent_size, 1);  // 0 would hit the x[..., -0:] slicing quirk
    v.real("decay_factor", o.decay_factor, 0.0, 1.0);
  }

  static Needs needs(const Options& o) {
    Needs n;
    n.attention = true;
    n.decay = o.decay_factor;
    return n;
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq(), start = o.start_size, recent = o.recent_size;
    if (seq <= detail::budget_sum(start, o.heavy_hitter_size, recent)) return std::nullopt;
    const int64_t middle_end = seq - recent;
    Selection s;
    s.keep_span(0, start);
    if (middle_end > start) {  // empty middle: sinks + recent, as StreamingLLM
      const int64_t middle = middle_end - start;
      s.keep_indices(top_k_positions_shared_by_heads(layer.attention.narrow(2, start, middle),
                                                     std::min(o.heavy_hitter_size, middle), start));
    }
    return s.keep_span(middle_end, recent);
  }
};

}  // namespace policies
}  // namespace kvcompress
