#pragma once
// A fixed-size cache: `fix_kv_size` tokens, a protected recent tail plus tokens chosen by norm.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

enum class FixSizeStrategy { keep_low, keep_high, random };

struct FixSizeL2Options {
  int64_t fix_kv_size = 1024;  ///< tokens kept per layer
  double keep_ratio = 0.0;     ///< share of fix_kv_size reserved for the most recent tokens
  FixSizeStrategy strategy = FixSizeStrategy::keep_low;
};

namespace policies {

struct FixSizeL2 {
  using Options = FixSizeL2Options;
  static constexpr const char* name = "fix_size_l2";

  static std::vector<int64_t> default_skip_layers() { return {0, 1}; }

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    // fix_kv_size 0 would keep "the last 0 tokens", which the reference's slicing turns into all.
    v.integer("fix_kv_size", o.fix_kv_size, 1);
    v.real("keep_ratio", o.keep_ratio, 0.0, 1.0);
    v.choice("strategy", o.strategy,
             {{"keep_low", FixSizeStrategy::keep_low},
              {"keep_high", FixSizeStrategy::keep_high},
              {"random", FixSizeStrategy::random}});
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t seq = layer.seq();
    if (seq <= o.fix_kv_size) return std::nullopt;
    const int64_t protect =
        std::min(detail::py_int(static_cast<double>(o.fix_kv_size) * o.keep_ratio), seq);
    const int64_t zone_end = seq - protect;
    const int64_t from_zone = o.fix_kv_size - protect;
    Selection s;
    if (from_zone <= 0) return s.keep_span(seq - protect, protect);
    if (zone_end <= from_zone) return std::nullopt;
    s.keep_indices(choose(o.strategy, layer.keys, zone_end, from_zone));
    return s.keep_span(zone_end, protect);
  }

 private:
  static at::Tensor choose(FixSizeStrategy strategy, const at::Tensor& keys, int64_t zone_end,
                           int64_t k) {
    switch (strategy) {
      case FixSizeStrategy::keep_high:
        return top_k_positions(key_norms(keys, 0, zone_end), k, 0, /*largest=*/true);
      case FixSizeStrategy::random: {
        // k smallest of i.i.d. uniforms = a uniform k-subset, drawn on the cache's device.
        at::Tensor u = at::rand({keys.size(0), keys.size(1), zone_end},
                                at::TensorOptions().dtype(at::kFloat).device(keys.device()));
        return top_k_positions(u, k, 0, /*largest=*/false);
      }
      case FixSizeStrategy::keep_low:
      default:
        return smallest_norm_positions(keys, 0, zone_end, k);
    }
  }
};

}  // namespace policies
}  // namespace kvcompress
