// Way in #1: one function per policy, like the seed's Python functions.
#include <kvcompress/kvcompress.hpp>

#include <iostream>

int main() {
  // A 4-layer cache of 1 row, 8 heads, 1500 tokens, head_dim 64: (keys, values) per layer.
  kvcompress::KVCache kv;
  for (int layer = 0; layer < 4; ++layer)
    kv.emplace_back(at::randn({1, 8, 1500, 64}), at::randn({1, 8, 1500, 64}));

  kvcompress::StreamingLLMOptions options;  // seed defaults: start_size=4, recent_size=508
  kvcompress::KVCache out = kvcompress::streaming_llm_compress(kv, options, /*skip_layers=*/{0, 1});

  auto h2o = kvcompress::h2o_l2_compress(kv, {/*start_size=*/4, /*heavy_hitter_size=*/128,
                                              /*recent_size=*/380});
  for (size_t i = 0; i < kv.size(); ++i)
    std::cout << "layer " << i << ": " << kv[i].first.size(2) << " -> streaming_llm "
              << out[i].first.size(2) << ", h2o_l2 " << h2o[i].first.size(2) << " tokens\n";
}
