#pragma once
// SnapKV (Li et al., 2024): the last `observation_window` queries vote for the prefix tokens
// they attend to; votes are pooled over neighbouring positions and every head keeps its
// top-voted prefix tokens plus the observation window itself. The paper compresses once after
// the prompt; here it runs whenever the cache compresses, with the window's queries attending
// to the cache as it is then (keys and queries as the model rotated them).
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

enum class SnapKVPooling { avg, max };

struct SnapKVOptions {
  int64_t observation_window = 32;
  int64_t keep_size = 512;      ///< tokens kept per head, the window included
  int64_t pooling_kernel = 5;   ///< 0 or 1: no pooling
  SnapKVPooling pooling = SnapKVPooling::avg;
};

namespace policies {

struct SnapKV {
  using Options = SnapKVOptions;
  static constexpr const char* name = "snapkv";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("observation_window", o.observation_window, 1);
    v.integer("keep_size", o.keep_size, 0);
    v.integer("pooling_kernel", o.pooling_kernel, 0);
    v.choice("pooling", o.pooling, {{"avg", SnapKVPooling::avg}, {"max", SnapKVPooling::max}});
  }

  static Needs needs(const Options& o) {
    Needs n;
    n.queries = o.observation_window;
    return n;
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    return detail::prefix_top_plus_window(layer.seq(), o.observation_window, o.keep_size,
                                          [&](int64_t prefix) { return votes(o, layer, prefix); });
  }

  /// select()'s ranking, for per-head budgets (AdaKV<SnapKV>).
  static std::optional<HeadScores> head_scores(const Options& o, const LayerView& layer) {
    return detail::prefix_scores_plus_window(layer.seq(), o.observation_window, o.keep_size,
                                             [&](int64_t prefix) { return votes(o, layer, prefix); });
  }

  /// The window's attention to each prefix slot, summed over its queries, then pooled (as the
  /// SnapKV code: stride 1, padding kernel / 2, average pools counting the padding).
  static at::Tensor votes(const Options& o, const LayerView& layer, int64_t prefix) {
    at::Tensor v = window_attention(layer).narrow(-1, 0, prefix).sum(2);
    const int64_t kernel = o.pooling_kernel;
    if (kernel <= 1 || prefix < kernel) return v;
    v = o.pooling == SnapKVPooling::avg
            ? at::avg_pool1d(v, {kernel}, {1}, {kernel / 2}, /*ceil_mode=*/false, /*count_include_pad=*/true)
            : at::max_pool1d(v, {kernel}, {1}, {kernel / 2});
    return v.size(-1) > prefix ? v.narrow(-1, 0, prefix) : v;  // even kernel: one extra
  }
};

}  // namespace policies
}  // namespace kvcompress
