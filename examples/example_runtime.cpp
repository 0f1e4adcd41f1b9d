// The runtime from your own code: load a contract model, prefill a prompt, then a greedy
// fixed-capacity decode loop with the compression in its place -- one step, one compression
// when the schedule says so -- replayed from a CUDA graph on a GPU. README "The runtime from
// your own code" walks through it; CI runs it on the bundled model.
//
//   example_runtime [MODEL.pt] [cpu|cuda]      (default: the bundled model, on CPU)
#include <kvcompress/kvcompress.hpp>
#include <kvcompress/runtime/runtime.hpp>

#include <cstdio>
#include <string>

#ifndef KVC_DATA_DIR
#define KVC_DATA_DIR "data"
#endif

namespace kvc = kvcompress;
namespace rt = kvcompress::runtime;

int main(int argc, char** argv) try {
  const std::string path = argc > 1 ? argv[1] : KVC_DATA_DIR "/pg19-neox-tiny.pt";
  const bool cuda = argc > 2 && std::string(argv[2]) == "cuda";
  const at::Device device = cuda ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);

  // 1. A contract model (docs/MODEL_CONTRACT.md) and the tokenizer it embeds.
  rt::ContractModel model = rt::ContractModel::load(path, device, cuda ? at::kHalf : at::kFloat);
  const auto tokenizer = model.tokenizer();
  const std::vector<int64_t> prompt = tokenizer->encode("It was a dark and stormy night; the rain fell in torrents");
  const int64_t new_tokens = 48, p = static_cast<int64_t>(prompt.size());

  // 2. A policy and a fixed-capacity decoder: buffers sized once for prompt + new tokens under
  //    this policy and schedule (no allocation per step), positions counted in the cache so
  //    the loop could run past the model's context, a CUDA graph per one-token step on a GPU.
  auto policy = kvc::make_compressor("streaming_llm(start_size=4, recent_size=28)");
  rt::DecoderOptions options;
  options.compressor = policy.get();
  options.positions = rt::PositionRule::cache;
  options.schedule = kvc::Schedule::chunk(8);  // compress back to budget once per 8 tokens
  auto decoder = rt::make_decoder(model, options, /*fixed_capacity=*/true, p + new_tokens, /*first_chunk=*/p,
                                  /*cuda_graph=*/cuda);

  // 3. Prefill, then decode: a step, and the compression in its place.
  c10::InferenceMode no_grad;
  decoder->prepare();  // captures the graph now, not in the first timed step
  const auto ids = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor next = decoder->prefill(at::tensor(prompt, ids.device(at::kCPU)).to(device).unsqueeze(0), 0)
                        .select(1, -1).argmax(-1, /*keepdim=*/true);  // [1, 1]
  decoder->maybe_compress();
  std::vector<int64_t> out = prompt;
  for (int64_t i = 0; i < new_tokens; ++i) {
    out.push_back(next.item<int64_t>());
    next = decoder->step(next).select(1, -1).argmax(-1, /*keepdim=*/true);
    decoder->maybe_compress();
  }

  // 4. What came out, and what the cache holds: at most the budget plus the slack per layer.
  std::printf("%s\n", tokenizer->decode(out).c_str());
  const auto lengths = decoder->lengths();
  std::printf("cache after %lld tokens: %lld tokens per layer (%s)\n", static_cast<long long>(out.size()),
              static_cast<long long>(lengths.front()), policy->spec().c_str());
  const at::Tensor kept = decoder->original_positions(0).select(0, 0).select(0, 0);
  std::printf("layer 0 keeps positions %lld..%lld after the sinks %lld..%lld\n",
              static_cast<long long>(kept[4].item<int64_t>()), static_cast<long long>(kept[-1].item<int64_t>()),
              static_cast<long long>(kept[0].item<int64_t>()), static_cast<long long>(kept[3].item<int64_t>()));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "example_runtime: %s\n", kvc::runtime::first_line(e).c_str());
  return 1;
}
