#pragma once
// H2O (Zhang et al., 2023) with key norms in place of accumulated attention: sinks, the
// smallest-norm "heavy hitters" of the middle, and a recent window.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct H2OL2Options {
  int64_t start_size = 4;
  int64_t heavy_hitter_size = 64;
  int64_t recent_size = 444;
};

namespace policies {

struct H2OL2 {
  using Options = H2OL2Options;
  static constexpr const char* name = "h2o_l2";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("start_size", o.start_size, 0);
    v.integer("heavy_hitter_size", o.heavy_hitter_size, 0);
    v.integer("recent_size", o.recent_size, 1);  // 0 would hit the x[..., -0:] slicing quirk
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    if (layer.seq() <= detail::budget_sum(o.start_size, o.heavy_hitter_size, o.recent_size)) return std::nullopt;
    return detail::sinks_middle_recent(layer.keys, o.start_size, o.heavy_hitter_size,
                                       o.recent_size, o.recent_size);
  }
};

}  // namespace policies
}  // namespace kvcompress
