#pragma once
// Adaptive KnormPress: the kept share falls from keep_ratio_max to keep_ratio_min as the cache
// grows from soft_limit to hard_limit; past hard_limit it is cut to target_size.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct AdaptiveL2Options {
  int64_t target_size = 512;
  int64_t soft_limit = 256;
  int64_t hard_limit = 1024;
  double keep_ratio_min = 0.3;
  double keep_ratio_max = 0.9;
};

namespace policies {

struct AdaptiveL2 {
  using Options = AdaptiveL2Options;
  static constexpr const char* name = "adaptive_l2";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("target_size", o.target_size, 1);  // 0: "the last 0 tokens" slicing quirk
    // Below 5 the protected tail int(n * 0.2) can be 0, and "the last 0 tokens" is the quirk.
    v.integer("soft_limit", o.soft_limit, 5);
    v.integer("hard_limit", o.hard_limit, 0);
    v.real("keep_ratio_min", o.keep_ratio_min, 0.0, 1.0);
    v.real("keep_ratio_max", o.keep_ratio_max, 0.0, 1.0);
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq();
    if (seq <= o.soft_limit) return std::nullopt;
    if (seq > o.hard_limit) {
      if (seq <= o.target_size) return std::nullopt;
      const int64_t recent = o.target_size / 2;
      const int64_t middle_keep = o.target_size - 4 - recent;
      if (middle_keep <= 0) return Selection().keep_span(seq - o.target_size, o.target_size);
      return detail::sinks_middle_recent(layer.keys, 4, middle_keep, recent, o.target_size - 4);
    }
    const double progress = static_cast<double>(seq - o.soft_limit) /
                            static_cast<double>(o.hard_limit - o.soft_limit);
    const double ratio = o.keep_ratio_max - progress * (o.keep_ratio_max - o.keep_ratio_min);
    const int64_t n = std::max(detail::py_int(static_cast<double>(seq) * ratio), o.soft_limit);
    if (n >= seq) return std::nullopt;
    const int64_t protect = detail::py_int(static_cast<double>(n) * 0.2);
    const int64_t history = n - protect;
    if (history <= 0) return Selection().keep_span(seq - n, n);
    const int64_t end = seq - protect;
    if (end <= history) return std::nullopt;
    Selection s;
    s.keep_indices(smallest_norm_positions(layer.keys, 0, end, history));
    return s.keep_span(end, protect);
  }
};

}  // namespace policies
}  // namespace kvcompress
