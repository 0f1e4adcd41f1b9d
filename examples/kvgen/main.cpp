// kvgen: text generation from a contract model with a compressed fixed-capacity KV cache. Takes
// a prompt, any method spec, prints the continuation as it is produced (standard output: only
// text), then the speed and the cache size (standard error). Greedy by default; sampling with
// --temperature, --top-k and --seed. A small tool over kvcompress::runtime: the prefill, the
// decode loop and the compression are the runtime's StaticDecoder (decoder.hpp).
#include "../common/blas_threads.hpp"
#include "../common/tool_cli.hpp"

#include <kvcompress/runtime/runtime.hpp>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

namespace kvc = kvcompress;
namespace rt = kvcompress::runtime;

namespace {

using kvtools::fail;

struct Options {
  std::string model = std::string(KVC_DATA_DIR) + "/pg19-neox-tiny.pt";
  std::string prompt, method, device = "cpu", dtype, positions = "cache", schedule = "every";
  bool prompt_given = false, ignore_eos = false, cuda_graph = false, quiet = false;
  int64_t max_new_tokens = 64, top_k = 0, seed = 0, slack = 64, threads = 0;
  double temperature = 0.0;
  std::vector<int64_t> skip_layers;
};

Options parse_args(int argc, char** argv) {
  Options o;
  kvtools::Cli cli("kvgen",
                   "Generates a continuation of the prompt with a contract model (docs/MODEL_CONTRACT.md) whose KV\n"
                   "cache is compressed by --method, printing it as it is produced; then tokens/s and the cache size\n"
                   "on standard error. Usage: kvgen (--prompt TEXT | --prompt-file FILE) [options]",
                   std::string("kvgen (kvcompress ") + kvc::version_string + ")");
  const char* input = "Input";
  const char* generation = "Generation";
  const char* runtime = "Runtime";
  auto prompt = [&o](const std::string& text) {
    if (o.prompt_given) fail("give one of --prompt and --prompt-file, once");
    o.prompt = text;
    o.prompt_given = true;
  };
  cli.text("--model", o.model, "FILE", input,
           "contract model (default: the bundled data/pg19-neox-tiny.pt); its embedded\n"
           "tokenizer (SentencePiece or tokenizer.json) reads and writes text");
  cli.option("--prompt", "TEXT", input, "the prompt", prompt);
  cli.option("--prompt-file", "FILE", input, "the prompt, from a UTF-8 file",
             [prompt](const std::string& path) { prompt(kvtools::read_file(path, "prompt")); });
  cli.text("--method", o.method, "SPEC", generation,
           "compression method, e.g. 'streaming_llm(start_size=4, recent_size=252)'\n"
           "(default: none, the full cache); kvbench --list-methods lists them");
  cli.count("--max-new-tokens", o.max_new_tokens, 1, generation, "tokens to generate (default 64)");
  cli.flag("--ignore-eos", generation, "keep going after the model's end-of-text token", [&o] { o.ignore_eos = true; });
  cli.option("--temperature", "T", generation, "sample at temperature T (default 0: greedy)", [&o](const std::string& v) {
    char* end = nullptr;
    o.temperature = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !std::isfinite(o.temperature) || o.temperature < 0 || o.temperature > 100)
      fail("--temperature expects a number in [0, 100], got '" + kvc::params::printable(v) + "'");
  });
  cli.count("--top-k", o.top_k, 0, generation, "sample among the K most likely tokens only (default 0: all)");
  cli.count("--seed", o.seed, 0, generation, "random seed for sampling (default 0)");
  cli.choice("--positions", o.positions, {"original", "cache"}, runtime,
             "position rule (default cache: positions count the cache's slots, so\n"
             "generation can run past the model's context; docs/ALGORITHMS.md)");
  cli.option("--skip-layers", "LIST", runtime, "layers left uncompressed when the spec does not say (default: none)",
             [&o](const std::string& v) { o.skip_layers = kvtools::parse_int_list("--skip-layers", v); });
  cli.choice("--schedule", o.schedule, {"every", "chunked"}, runtime,
             "compress after every token (default) or once per --slack tokens");
  cli.count("--slack", o.slack, 1, runtime, "tokens between compressions for --schedule chunked (default 64)");
  cli.choice("--device", o.device, {"cpu", "cuda"}, runtime, "(default cpu)");
  cli.choice("--dtype", o.dtype, {"float32", "float16", "bfloat16"}, runtime, "(default float32 on cpu, float16 on cuda)");
  cli.flag("--cuda-graph", runtime, "replay each decode step from a CUDA graph", [&o] { o.cuda_graph = true; });
  cli.count("--threads", o.threads, 1, runtime, "CPU threads for LibTorch and its OpenBLAS (default: LibTorch's\nchoice)");
  cli.flag("--quiet", runtime, "the text only, no figures", [&o] { o.quiet = true; });
  cli.parse(argc, argv);
  if (!o.prompt_given) fail("give a prompt: --prompt TEXT or --prompt-file FILE");
  if (o.dtype.empty()) o.dtype = o.device == "cuda" ? "float16" : "float32";
  if (o.cuda_graph && o.device != "cuda") fail("--cuda-graph needs --device cuda");
  if (o.top_k > 0 && o.temperature == 0) fail("--top-k samples: give --temperature > 0 too");
  return o;
}

// The next token from one row's float32 logits [vocab] on the host: the argmax, or a draw at
// `temperature` among the `top_k` most likely (all when 0).
int64_t pick(const at::Tensor& logits, const Options& o, std::mt19937_64& rng) {
  const float* l = logits.data_ptr<float>();
  const int64_t v = logits.numel();
  if (o.temperature == 0) return std::max_element(l, l + v) - l;
  std::vector<int64_t> ids(static_cast<size_t>(v));
  for (int64_t i = 0; i < v; ++i) ids[static_cast<size_t>(i)] = i;
  const int64_t k = o.top_k > 0 ? std::min(o.top_k, v) : v;
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
  std::vector<double> p(static_cast<size_t>(k));
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += p[static_cast<size_t>(i)] = std::exp((l[ids[i]] - l[ids[0]]) / o.temperature);
  double u = std::uniform_real_distribution<double>(0.0, sum)(rng);
  for (int64_t i = 0; i < k; ++i)
    if ((u -= p[static_cast<size_t>(i)]) <= 0) return ids[static_cast<size_t>(i)];
  return ids[static_cast<size_t>(k - 1)];
}

bool g_wrote = false;  // whether standard output holds text (an error then starts a new line)

void write_out(const std::string& bytes) {
  g_wrote = g_wrote || !bytes.empty();
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size()) fail("cannot write to standard output");
  std::fflush(stdout);
}

int run(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  kvtools::restart_with_passive_openmp(o.threads > 0 ? static_cast<int>(o.threads) : at::get_num_threads(), argv);
  if (o.threads > 0) at::set_num_threads(static_cast<int>(o.threads));
  const kvtools::BlasThreads blas_threads(static_cast<int>(o.threads));  // --threads N: N threads
  torch::jit::setGraphExecutorOptimize(o.cuda_graph);
  at::Device device(at::kCPU);
  if (o.device == "cuda") {
    if (!at::hasCUDA()) fail("--device cuda: no CUDA device is available (or this LibTorch has no CUDA)");
    device = at::Device(at::kCUDA, 0);
  }
  const at::ScalarType dtype = o.dtype == "float16" ? at::kHalf : o.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  std::unique_ptr<kvc::Compressor> compressor;
  if (!o.method.empty()) compressor = kvc::make_compressor(kvtools::with_skip_layers(kvc::parse_spec(o.method), o.skip_layers));
  rt::ContractModel model = rt::ContractModel::load(o.model, device, dtype);
  const auto tokenizer = model.tokenizer();
  const std::vector<int64_t> prompt = tokenizer->encode(o.prompt);
  if (prompt.empty()) fail("the prompt has no tokens");
  for (int64_t id : prompt)
    if (id >= model.info().vocab_size)
      fail("the tokenizer gave id " + std::to_string(id) + ", outside the model's vocabulary of " +
           std::to_string(model.info().vocab_size));
  const int64_t p = static_cast<int64_t>(prompt.size()), n = o.max_new_tokens;

  rt::DecoderOptions d;
  d.compressor = compressor.get();
  d.positions = o.positions == "cache" ? rt::PositionRule::cache : rt::PositionRule::original;
  d.schedule = o.schedule == "chunked" ? kvc::Schedule::chunk(o.slack) : kvc::Schedule::every();
  if (compressor) rt::Decoder::require_scores_from(model, *compressor);
  auto decoder = rt::make_decoder(model, d, /*fixed_capacity=*/true, p + n, p, o.cuda_graph);
  const int64_t context = model.info().max_positions;
  if (!o.quiet && (!compressor || d.positions == rt::PositionRule::original) && p + n > context)
    std::fprintf(stderr, "kvgen: note: %lld tokens pass the model's context of %lld; positions past it were "
                 "never trained (compress with --positions cache to stay inside)\n", (long long)(p + n), (long long)context);

  c10::InferenceMode guard;
  std::mt19937_64 rng(static_cast<uint64_t>(o.seed));
  std::vector<int64_t> all = prompt;
  std::string shown = tokenizer->decode_bytes(all);
  write_out(shown);
  const auto t0 = std::chrono::steady_clock::now();
  decoder->prepare();
  at::Tensor ids = at::tensor(prompt, at::TensorOptions().dtype(at::kLong)).to(device).unsqueeze(0);
  at::Tensor logits = decoder->prefill(ids, 0).select(1, -1);
  decoder->maybe_compress();
  double first_s = 0;
  int64_t made = 0;
  const int64_t eos = model.info().eos_token_id;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t next = pick(logits.to(at::kCPU, at::kFloat).contiguous().view({-1}), o, rng);
    if (i == 0) first_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (next == eos && !o.ignore_eos) break;
    all.push_back(next);
    ++made;
    const std::string text = tokenizer->decode_bytes(all);  // whole, so pieces join as they should
    write_out(text.substr(std::min(shown.size(), text.size())));
    shown = text;
    if (i + 1 == n) break;
    logits = decoder->step(at::full({1, 1}, next, ids.options())).select(1, -1);
    decoder->maybe_compress();
  }
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_out("\n");
  if (o.quiet) return 0;
  const auto lengths = decoder->lengths();
  int64_t bytes = 0;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  for (int64_t len : lengths) bytes += 2 * len * model.info().num_heads * model.info().head_dim * elem;
  const auto [lo, hi] = std::minmax_element(lengths.begin(), lengths.end());
  std::fprintf(stderr, "\n%lld prompt tokens, %lld new: first token after %.3f s (the prefill and this "
               "process's one-time start-up), then %.1f tokens/s (%s on %s/%s, host clock, printing included)\n",
               (long long)p, (long long)made, first_s,
               made > 1 ? static_cast<double>(made - 1) / std::max(total_s - first_s, 1e-9) : 0.0,
               compressor ? compressor->spec().c_str() : "full cache", device.str().c_str(), o.dtype.c_str());
  std::fprintf(stderr, "cache: %lld..%lld tokens per layer (%lld seen), %.2f MiB of keys and values\n",
               (long long)*lo, (long long)*hi, (long long)(p + made), static_cast<double>(bytes) / (1 << 20));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "%skvgen: error: %s\n", g_wrote ? "\n" : "", kvc::params::printable(rt::first_line(e)).c_str());
    return 2;
  }
}
