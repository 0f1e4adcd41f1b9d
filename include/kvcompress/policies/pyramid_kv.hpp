#pragma once
// PyramidKV (Cai et al., 2024): budgets shrink with depth; each layer keeps sinks, the
// smallest-norm middle and a recent window within its budget.
#include <kvcompress/policies/common.hpp>

namespace kvcompress {

enum class PyramidProfile { exponential, linear, constant };

struct PyramidKVOptions {
  int64_t base_size = 512;
  double layer_decay = 0.9;
  int64_t min_size = 64;
  PyramidProfile profile = PyramidProfile::exponential;
};

namespace policies {

struct PyramidKV {
  using Options = PyramidKVOptions;
  static constexpr const char* name = "pyramid_kv";

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("base_size", o.base_size, 1);
    v.real("layer_decay", o.layer_decay, 0.0, 1e300);
    // A budget of 1 makes recent = 0, and "the last 0 tokens" is the slicing quirk.
    v.integer("min_size", o.min_size, 2);
    v.choice("profile", o.profile,
             {{"exponential", PyramidProfile::exponential},
              {"linear", PyramidProfile::linear},
              {"constant", PyramidProfile::constant}});
  }

  /// Budget of layer `i` of `num_layers`, computed in doubles exactly as the seed writes it.
  static int64_t layer_budget(const Options& o, int64_t i, int64_t num_layers) {
    int64_t size = o.base_size;
    switch (o.profile) {
      case PyramidProfile::exponential:
        size = detail::py_int(static_cast<double>(o.base_size) *
                              std::pow(o.layer_decay, static_cast<double>(i)));
        break;
      case PyramidProfile::linear:
        // i * (base - min) in double: exact wherever the int64 product is, and no overflow.
        size = detail::py_int(static_cast<double>(o.base_size) -
                              static_cast<double>(i) * static_cast<double>(o.base_size - o.min_size) /
                                  static_cast<double>(std::max<int64_t>(num_layers - 1, 1)));
        break;
      case PyramidProfile::constant:
        break;
    }
    return std::max(size, o.min_size);
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    const int64_t size = layer_budget(o, layer.layer, layer.num_layers);
    const int64_t seq = layer.seq();
    if (seq <= size) return std::nullopt;
    const int64_t start = std::min<int64_t>(4, size / 8);
    const int64_t recent = size / 2;
    const int64_t middle_keep = size - start - recent;
    if (middle_keep <= 0) return Selection().keep_span(seq - size, size);
    return detail::sinks_middle_recent(layer.keys, start, middle_keep, recent, size - start);
  }
};

}  // namespace policies
}  // namespace kvcompress
