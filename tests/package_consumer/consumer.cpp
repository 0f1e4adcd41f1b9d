// Built against the installed package: compresses through the registry and checks the result.
#include <kvcompress/kvcompress.hpp>

#include <cstdio>

int main() {
  at::Tensor keys = at::randn({1, 2, 64, 8}), values = at::randn({1, 2, 64, 8});
  kvcompress::KVCache kv{{keys, values}, {keys, values}, {keys, values}};
  auto c = kvcompress::make_compressor("streaming_llm(start_size=4, recent_size=28, skip_layers=[0,1])");
  auto out = c->compress(kv);
  const bool ok = out[0].first.size(2) == 64 && out[2].first.size(2) == 32 &&
                  at::equal(out[2].second.narrow(2, 4, 28), values.narrow(2, 36, 28));
  std::printf("%s: %s\n", c->spec().c_str(), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
