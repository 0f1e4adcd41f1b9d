// Compress latency of every policy on a Pythia-2.8B-shaped cache: 32 layers x 32 heads x
// 2000 tokens x head_dim 80, budget 512, batch 1, through the functional API (new tensors) and
// through the fixed-capacity cache (in-place compaction). Device and dtype from the environment:
//   KVC_BENCH_DEVICE=cpu|cuda (default cpu), KVC_BENCH_DTYPE=float32|float16|bfloat16
//   (default float32 on CPU, float16 on CUDA), KVC_BENCH_LAYERS (default 32).
#include <kvcompress/kvcompress.hpp>

#include <benchmark/benchmark.h>

#include <cstdlib>
#include <memory>
#include <iostream>
#include <string>

namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

struct Setup {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  int64_t layers = 32;
  Setup() {
    const std::string dev = env_or("KVC_BENCH_DEVICE", "cpu");
    if (dev == "cuda") device = at::Device(at::kCUDA, 0);
    else if (dev != "cpu") throw kvcompress::Error("KVC_BENCH_DEVICE must be cpu or cuda, got " + dev);
    const std::string dt = env_or("KVC_BENCH_DTYPE", dev == "cuda" ? "float16" : "float32");
    if (dt == "float16") dtype = at::kHalf;
    else if (dt == "bfloat16") dtype = at::kBFloat16;
    else if (dt != "float32") throw kvcompress::Error("KVC_BENCH_DTYPE must be float32, float16 or bfloat16");
    layers = std::stoll(env_or("KVC_BENCH_LAYERS", "32"));
  }
};

const Setup& setup() {
  static Setup s;
  return s;
}

const kvcompress::KVCache& cache() {
  static kvcompress::KVCache kv = [] {
    const auto& s = setup();
    kvcompress::KVCache c;
    auto opts = at::TensorOptions().dtype(s.dtype).device(s.device);
    for (int64_t i = 0; i < s.layers; ++i)
      c.emplace_back(at::randn({1, 32, 2000, 80}, opts), at::randn({1, 32, 2000, 80}, opts));
    return c;
  }();
  return kv;
}

void sync() {
  // A device round trip only in the benchmark: the library itself never synchronises.
  if (setup().device.is_cuda()) cache()[0].first.sum().item<float>();
}

void BM_Compress(benchmark::State& state, const std::string& spec) {
  auto compressor = kvcompress::make_compressor(spec);
  const auto& kv = cache();
  for (auto _ : state) {
    auto out = compressor->compress(kv);
    sync();
    benchmark::DoNotOptimize(out);
  }
  state.SetLabel(compressor->spec());
}

// The same compression, in place: a StaticCache refilled to 2000 tokens before each timed call.
void BM_CompressInPlace(benchmark::State& state, const std::string& spec) {
  auto compressor = kvcompress::make_compressor(spec);
  const auto& s = setup();
  static std::unique_ptr<kvcompress::StaticCache> cache;
  if (!cache) {
    cache = std::make_unique<kvcompress::StaticCache>(s.layers, 1, 32, 80, std::vector<int64_t>{2000},
                                                      at::TensorOptions().dtype(s.dtype).device(s.device));
    for (int64_t l = 0; l < s.layers; ++l) {
      cache->key_buffer(l).normal_();
      cache->value_buffer(l).normal_();
    }
  }
  for (auto _ : state) {
    state.PauseTiming();
    cache->clear();
    cache->commit_step(2000, 0);
    sync();
    state.ResumeTiming();
    cache->compress(*compressor);
    sync();
  }
  state.SetLabel(compressor->spec());
}

// The compare-all set at budget 512, with the benchmark's skip_layers=[0,1].
const char* kSpecs[][2] = {
    {"l2", "l2(keep_ratio=0.256, prune_after=512, skip_layers=[0,1])"},
    {"fix_size_l2", "fix_size_l2(fix_kv_size=512, keep_ratio=0.5, strategy=keep_low, skip_layers=[0,1])"},
    {"streaming_llm", "streaming_llm(start_size=4, recent_size=508, skip_layers=[0,1])"},
    {"h2o_l2", "h2o_l2(start_size=4, heavy_hitter_size=64, recent_size=444, skip_layers=[0,1])"},
    {"snapkv_lite", "snapkv_lite(observation_window=32, keep_size=512, skip_layers=[0,1])"},
    {"pyramid_kv", "pyramid_kv(base_size=512, layer_decay=0.9, min_size=64, skip_layers=[0,1])"},
    {"adaptive_l2", "adaptive_l2(target_size=512, soft_limit=256, hard_limit=1024, skip_layers=[0,1])"},
    {"recent_only", "recent_only(window_size=512, skip_layers=[0,1])"},
};

}  // namespace

int main(int argc, char** argv) {
  try {
    const auto& s = setup();
    if (s.device.is_cuda() && !at::hasCUDA()) {
      std::cerr << "bench_compress: KVC_BENCH_DEVICE=cuda but no CUDA device is available\n";
      return 2;
    }
    benchmark::AddCustomContext("kvc_device", s.device.str());
    benchmark::AddCustomContext("kvc_dtype", c10::toString(s.dtype));
    benchmark::AddCustomContext("kvc_cache", std::to_string(s.layers) + "x[1,32,2000,80] -> 512");
  } catch (const std::exception& e) {
    std::cerr << "bench_compress: " << e.what() << '\n';
    return 2;
  }
  for (const auto& spec : kSpecs) {
    benchmark::RegisterBenchmark((std::string("functional/") + spec[0]).c_str(), BM_Compress, std::string(spec[1]))
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark((std::string("in_place/") + spec[0]).c_str(), BM_CompressInPlace, std::string(spec[1]))
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
