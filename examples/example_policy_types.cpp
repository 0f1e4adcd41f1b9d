// Way in #3: policy types in templated code, no registry and no virtual call per layer; and a
// policy of your own, registered under a new name.
#include <kvcompress/kvcompress.hpp>

#include <iostream>

// Keeps the first `head` tokens and every `stride`-th token after them. (skip_layers is the
// compressor's: every policy accepts it without declaring it.)
struct StridedPolicy {
  struct Options {
    int64_t head = 16;
    int64_t stride = 4;
  };
  static constexpr const char* name = "strided";
  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("head", o.head, 0);
    v.integer("stride", o.stride, 1);
  }
  static std::optional<kvcompress::Selection> select(const Options& o, const kvcompress::LayerView& layer) {
    if (layer.seq() <= o.head) return std::nullopt;
    kvcompress::Selection s;
    s.keep_span(0, o.head);
    for (int64_t t = o.head; t < layer.seq(); t += o.stride) s.keep_span(t, 1);
    return s;
  }
};

template <class Policy>
int64_t kept_tokens(const kvcompress::KVCache& kv, typename Policy::Options options,
                    std::vector<int64_t> skip_layers = {}) {
  kvcompress::BasicCompressor<Policy> compressor(std::move(options), std::move(skip_layers));
  return compressor.compress(kv).back().first.size(2);
}

int main() {
  kvcompress::KVCache kv(2, {at::randn({1, 4, 1000, 32}), at::randn({1, 4, 1000, 32})});
  std::cout << "recent_only: " << kept_tokens<kvcompress::policies::RecentOnly>(kv, {256}) << '\n';
  std::cout << "pyramid_kv:  " << kept_tokens<kvcompress::policies::PyramidKV>(kv, {}) << '\n';
  std::cout << "strided:     " << kept_tokens<StridedPolicy>(kv, {}) << '\n';

  kvcompress::register_policy<StridedPolicy>();
  auto c = kvcompress::make_compressor("strided(head=8, stride=10)");
  std::cout << c->spec() << ": " << c->compress(kv).back().first.size(2) << '\n';
}
