#pragma once
// KnormPress (Devoto et al., 2024): keep the keys of smallest L2 norm.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

struct L2Options {
  double keep_ratio = 1.0;   ///< fraction kept, in (0, 1]; 1 keeps everything
  int64_t prune_after = 1000;  ///< layers of at most this many tokens are left alone
};

namespace policies {

struct L2 {
  using Options = L2Options;
  static constexpr const char* name = "l2";

  static std::vector<int64_t> default_skip_layers() { return {0, 1}; }
  static std::vector<std::string> aliases() { return {"l2_compress"}; }  // the seed's function name

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.real("keep_ratio", o.keep_ratio, 0.0, 1.0, /*lo_open=*/true);
    v.integer("prune_after", o.prune_after, 0);
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq();
    if (o.keep_ratio >= 1.0 || seq <= o.prune_after) return std::nullopt;
    const int64_t n = detail::py_ceil(o.keep_ratio * static_cast<double>(seq));
    if (n >= seq) return std::nullopt;
    Selection s;
    s.keep_indices(smallest_norm_positions(layer.keys, 0, seq, n));
    return s;
  }
};

}  // namespace policies
}  // namespace kvcompress
