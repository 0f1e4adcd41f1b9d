// Built against the installed package: compresses through the registry, then (with the runtime
// component) evaluates a few tokens of a contract model in both caches under the cache rule.
#include <kvcompress/kvcompress.hpp>
#include <kvcompress/runtime/runtime.hpp>

#include <cmath>
#include <cstdio>

namespace rt = kvcompress::runtime;

int main(int argc, char** argv) {
  at::Tensor keys = at::randn({1, 2, 64, 8}), values = at::randn({1, 2, 64, 8});
  kvcompress::KVCache kv{{keys, values}, {keys, values}, {keys, values}};
  auto c = kvcompress::make_compressor("streaming_llm(start_size=4, recent_size=28, skip_layers=[0,1])");
  auto out = c->compress(kv);
  bool ok = out[0].first.size(2) == 64 && out[2].first.size(2) == 32 &&
            at::equal(out[2].second.narrow(2, 4, 28), values.narrow(2, 36, 28));
  std::printf("library: %s: %s\n", c->spec().c_str(), ok ? "ok" : "WRONG");
  if (argc < 2) return ok ? 0 : 1;

  rt::ContractModel model = rt::ContractModel::load(argv[1], at::kCPU, at::kFloat);
  auto window = kvcompress::make_compressor("streaming_llm(start_size=2, recent_size=14)");
  std::vector<int64_t> tokens;
  for (int64_t i = 0; i < 40; ++i) tokens.push_back((i * 37) % model.info().vocab_size);
  rt::DecoderOptions o;
  o.compressor = window.get();
  o.positions = rt::PositionRule::cache;
  rt::ConcatDecoder concat(model, o);
  auto fixed = rt::make_decoder(model, o, /*fixed_capacity=*/true, 40, 1);
  rt::RunMetrics a, b;
  rt::evaluate(concat, tokens, a);
  rt::evaluate(*fixed, tokens, b);
  const bool rt_ok = a.cache_tokens == 16 && b.cache_tokens == 16 && std::abs(a.nll_sum - b.nll_sum) < 1e-4 * a.nll_sum;
  std::printf("runtime (CUDA support: %s): nll %.6f vs %.6f, cache %lld: %s\n", rt::built_with_cuda() ? "yes" : "no",
              a.nll_sum, b.nll_sum, (long long)a.cache_tokens, rt_ok ? "ok" : "WRONG");
  return ok && rt_ok ? 0 : 1;
}
