#pragma once
// A sliding window: the most recent `window_size` tokens.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct RecentOnlyOptions {
  int64_t window_size = 512;
};

namespace policies {

struct RecentOnly {
  using Options = RecentOnlyOptions;
  static constexpr const char* name = "recent_only";

  static std::vector<int64_t> default_skip_layers() { return {0, 1}; }

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("window_size", o.window_size, 1);  // 0 would hit the x[..., -0:] slicing quirk
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq();
    if (seq <= o.window_size) return std::nullopt;
    return Selection().keep_span(seq - o.window_size, o.window_size);
  }
};

}  // namespace policies
}  // namespace kvcompress
