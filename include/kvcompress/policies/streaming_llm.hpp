#pragma once
// StreamingLLM (Xiao et al., 2023): attention sinks plus a recent window.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct StreamingLLMOptions {
  int64_t start_size = 4;     ///< sink tokens kept from the start
  int64_t recent_size = 508;  ///< most recent tokens kept
};

namespace policies {

struct StreamingLLM {
  using Options = StreamingLLMOptions;
  static constexpr const char* name = "streaming_llm";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("start_size", o.start_size, 0);
    v.integer("recent_size", o.recent_size, 1);  // 0 would hit the x[..., -0:] slicing quirk
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq();
    if (seq <= detail::budget_sum(o.start_size, o.recent_size)) return std::nullopt;
    Selection s;
    return s.keep_span(0, o.start_size).keep_span(seq - o.recent_size, o.recent_size);
  }
};

}  // namespace policies
}  // namespace kvcompress
