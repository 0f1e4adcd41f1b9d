#pragma once
// H2O (Zhang et al., 2023, "Heavy-Hitter Oracle"): every head keeps its own heavy hitters -- the
// tokens with the largest attention accumulated over all queries since they arrived -- plus the
// most recent tokens. Per head, no decay, no sinks, as the paper.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct H2OOptions {
  int64_t heavy_hitter_size = 256;
  int64_t recent_size = 256;
};

namespace policies {

struct H2O {
  using Options = H2OOptions;
  static constexpr const char* name = "h2o";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("heavy_hitter_size", o.heavy_hitter_size, 0);
    v.integer("recent_size", o.recent_size, 1);
  }

  static Needs needs(const Options&) {
    Needs n;
    n.attention = true;
    return n;
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq();
    if (seq <= detail::budget_sum(o.heavy_hitter_size, o.recent_size)) return std::nullopt;
    const int64_t middle = seq - o.recent_size;
    Selection s;
    s.keep_indices(top_k_positions(layer.attention.narrow(2, 0, middle), o.heavy_hitter_size, 0, /*largest=*/true));
    return s.keep_span(middle, o.recent_size);
  }

  /// select()'s ranking, for per-head budgets (AdaKV<H2O>): the accumulated attention, +inf
  /// for the recent window.
  static std::optional<HeadScores> head_scores(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq();
    if (seq <= detail::budget_sum(o.heavy_hitter_size, o.recent_size)) return std::nullopt;
    at::Tensor s = layer.attention.clone();
    s.narrow(2, seq - o.recent_size, o.recent_size).fill_(std::numeric_limits<double>::infinity());
    return HeadScores{s, o.heavy_hitter_size + o.recent_size};
  }
};

}  // namespace policies
}  // namespace kvcompress
