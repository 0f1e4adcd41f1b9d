#pragma once
// SnapKV (Li et al., 2024), lite: the observation window is always kept; prefix tokens are
// scored by how far their key norm sits below the largest one, smoothed by an average pool.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct SnapKVLiteOptions {
  int64_t observation_window = 32;
  int64_t keep_size = 512;
  int64_t pooling_kernel = 5;  ///< 0 or 1: no pooling; even kernels are valid (output trimmed)
};

namespace policies {

struct SnapKVLite {
  using Options = SnapKVLiteOptions;
  static constexpr const char* name = "snapkv_lite";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("observation_window", o.observation_window, 1);  // 0: x[..., -0:] quirk
    v.integer("keep_size", o.keep_size, 0);
    v.integer("pooling_kernel", o.pooling_kernel, 0);
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    return detail::prefix_top_plus_window(layer.seq(), o.observation_window, o.keep_size,
                                          [&](int64_t prefix) { return scores(o, layer.keys, prefix); });
  }

  /// score_i = (max_j norm_j + 1e-6) - norm_i over the prefix, then the optional average pool.
  static at::Tensor scores(const Options& o, const at::Tensor& keys, int64_t prefix) {
    const at::Tensor norms = key_norms(keys, 0, prefix);
    at::Tensor score = (std::get<0>(norms.max(-1, /*keepdim=*/true)) + 1e-6) - norms;
    const int64_t kernel = o.pooling_kernel;
    if (kernel > 1 && prefix >= kernel) {
      // count_include_pad: padding zeros count in every window, as the reference's pool does.
      score = at::avg_pool1d(score, {kernel}, {1}, {kernel / 2}, /*ceil_mode=*/false,
                             /*count_include_pad=*/true);
      if (score.size(-1) > prefix) score = score.narrow(-1, 0, prefix);  // even kernel: one extra
    }
    return score;
  }
};

}  // namespace policies
}  // namespace kvcompress
