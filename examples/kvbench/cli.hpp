#pragma once
// kvbench's command line: the options, their parsing and checks, and the runs they ask for.
#include <kvcompress/kvcompress.hpp>
#include <kvcompress/runtime/device.hpp>
#include <kvcompress/runtime/evaluate.hpp>

#include "../common/tool_cli.hpp"

#include <torch/version.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#ifndef KVC_DATA_DIR
#define KVC_DATA_DIR "data"
#endif

namespace kvbench {

namespace kvc = kvcompress;
namespace rt = kvcompress::runtime;

using kvtools::fail;
using kvtools::parse_choice;
using kvtools::parse_count;
using kvtools::parse_int_list;

struct Options {
  std::string model = std::string(KVC_DATA_DIR) + "/pg19-neox-tiny.pt";
  std::vector<std::string> texts, token_files;
  int64_t samples = 0;  // 0: every input given, or 2 bundled ones
  int64_t max_tokens = 2000, generate = 32, prompt_tokens = 512, threads = 0;
  int64_t window = -1;  // -1: 1024 when a sample is longer than the model's context
  std::string device = "cpu", dtype;
  std::vector<std::pair<std::string, std::string>> methods;  // label, spec
  bool compare_all = false, compare_attention = false, baseline = true, quiet = false, recompute_reference = false;
  int jit_optimize = -1;  // -1: on with --cuda-graph
  std::string schedule;   // "" = the concatenating cache
  std::string positions = "original";
  int64_t slack = 64, batch = 1, prefill_chunk = 0;
  bool cuda_graph = false, native_step = false, compress_prefill = false, shared_prompt = false, eval = true,
       skip_layers_given = false;
  std::vector<int64_t> budgets = {512, 1024}, skip_layers = {0, 1};
  std::string json, csv, save_tokens;
  int64_t repeats = 3;     // runs of every timed measurement (median, min, max)
  bool wide = false;       // one wide table instead of quality and speed
  bool results = true;     // write the results folder
  std::string out_dir, run_name;
  std::string trace;       // JSON lines of what each compression kept
  int one_pass = -1;       // evaluate every run as a row of one batch; -1: when two or more runs evaluate
  int64_t workers = 0;     // host threads of the one pass; 0: the machine's cores on a CPU, 1 on CUDA
  int process_per_repeat = -1;   // each generation round in a fresh process; -1: on the CPU
  int64_t generation_round_fd = 0;  // > 0: this process is one such round (rounds.hpp)
  std::string generation_round_prompt;  // its token ids: the parent's prompt (rounds.hpp)
  bool throughput = false;              // time over contexts x batches instead (throughput.hpp)
  std::vector<int64_t> contexts, batches;  // empty: --prompt-tokens, --batch
  bool largest_batch = false;           // also search the largest batch that fits
  int64_t memory_limit = 0;             // bytes a batch may peak at (0: the device's memory)

  bool static_cache() const { return !schedule.empty() || cuda_graph; }
  rt::PositionRule rule() const { return positions == "cache" ? rt::PositionRule::cache : rt::PositionRule::original; }
  kvc::Schedule compression_schedule() const {
    return schedule == "chunked" ? kvc::Schedule::chunk(slack) : kvc::Schedule::every();
  }
};

// "40GiB", "512MiB", "1.5GiB", "4096" (bytes): a size in bytes, binary units.
inline int64_t parse_size(const std::string& flag, const std::string& v) {
  static const std::vector<std::pair<std::string, double>> units = {
      {"TiB", 1099511627776.0}, {"GiB", 1073741824.0}, {"MiB", 1048576.0}, {"KiB", 1024.0}, {"B", 1.0}};
  double scale = 1.0;
  std::string number = v;
  for (const auto& [suffix, bytes] : units)
    if (v.size() > suffix.size() && v.compare(v.size() - suffix.size(), suffix.size(), suffix) == 0) {
      number = v.substr(0, v.size() - suffix.size());
      scale = bytes;
      break;
    }
  char* end = nullptr;
  errno = 0;
  const double x = std::strtod(number.c_str(), &end);
  const bool plain = !number.empty() && end == number.c_str() + number.size() && errno == 0 && std::isfinite(x);
  if (!plain || !(x > 0) || x * scale >= 9.2e18 || x * scale < 1)
    fail(flag + " must be a positive size such as 40GiB, 512MiB or a number of bytes, got " +
         kvc::params::printable(v));
  return static_cast<int64_t>(x * scale);
}

inline std::string version_text() {
  return std::string("kvbench ") + kvc::version_string + " (kvcompress " + kvc::version_string + ", LibTorch " +
         TORCH_VERSION + ", runtime " + (rt::built_with_cuda() ? "with" : "without") + " CUDA)";
}

// The command line (examples/common/tool_cli.hpp: CLI11, our conversions and messages).
inline Options parse_args(int argc, char** argv) {
  Options o;
  kvtools::Cli cli("kvbench",
                   "Evaluates a contract TorchScript model token by token (feed token t, score token t+1, compress\n"
                   "the cache) for the full cache and each method, as the course project did; then times a greedy\n"
                   "generation (prompt prefill, decode) --repeats times. Writes a results folder (JSON, CSV, plots).",
                   version_text());
  const char* inputs = "Inputs";
  const char* methods = "Methods";
  const char* runtime = "Runtime";
  const char* output = "Output";
  cli.text("--model", o.model, "FILE", inputs, "contract model (default: the bundled data/pg19-neox-tiny.pt)");
  cli.repeatable("--text", "FILE", inputs,
                 "UTF-8 text, tokenized with the tokenizer the model embeds (repeatable;\n"
                 "whole bundled books: data/books/*.txt)",
                 [&o](const std::string& v) { o.texts.push_back(v); });
  cli.repeatable("--tokens", "FILE", inputs, "token ids (kvtok --encode) (repeatable); default input: the bundled\neval excerpts",
                 [&o](const std::string& v) { o.token_files.push_back(v); });
  cli.count("--samples", o.samples, 1, inputs, "inputs to evaluate (default: every input given; 2 bundled excerpts)");
  cli.option("--max-tokens", "N", inputs, "first N tokens of each sample (default 2000; 0 = the whole text)",
             [&o](const std::string& v) {
               o.max_tokens = parse_count("--max-tokens", v, 0);
               if (o.max_tokens == 1) fail("--max-tokens must be 0 (the whole text) or >= 2, got 1");
             });
  cli.count("--window", o.window, 0, inputs,
            "quality per N-token window too (default 1024 when a sample is longer\nthan the model's context, else 0 = off)");
  cli.flag("--recompute-reference", inputs,
           "add the long-text oracle: each window scored by a fresh forward over\nthe model's context (needs windows)",
           [&o] { o.recompute_reference = true; });
  cli.text("--save-tokens", o.save_tokens, "DIR", inputs, "write each sample's token ids, as evaluated, to DIR/<stem>.ids");

  cli.repeatable("--method", "SPEC", methods,
                 "a method, e.g. 'h2o_l2(heavy_hitter_size=128)', or LABEL=SPEC\n(repeatable)",
                 [&o](const std::string& v) {
                   const auto eq = v.find('='), paren = v.find('(');
                   if (eq != std::string::npos && (paren == std::string::npos || eq < paren))
                     o.methods.emplace_back(v.substr(0, eq), v.substr(eq + 1));
                   else
                     o.methods.emplace_back("", v);
                 });
  cli.flag("--compare-all", methods, "the course project's seven methods at each budget", [&o] { o.compare_all = true; });
  cli.flag("--compare-attention", methods,
           "the attention-aware methods beside their key-norm proxies at each\nbudget",
           [&o] { o.compare_attention = true; });
  cli.option("--budgets", "LIST", methods, "budgets for --compare-all / --compare-attention (default 512,1024)",
             [&o](const std::string& v) { o.budgets = parse_int_list("--budgets", v); });
  cli.option("--skip-layers", "LIST", methods,
             "layers left uncompressed by every method whose spec does not set them\n"
             "(default 0,1 with positions original; none with positions cache; '' none)",
             [&o](const std::string& v) {
               o.skip_layers = parse_int_list("--skip-layers", v);
               o.skip_layers_given = true;
             });
  cli.flag("--no-baseline", methods, "skip the full-cache run", [&o] { o.baseline = false; });
  cli.flag("--list-methods", methods, "print the registered methods (canonical specs) and exit", [] {
    for (const auto& m : kvc::list_methods()) std::cout << kvc::make_compressor(m)->spec() << '\n';
    std::exit(0);
  });

  cli.choice("--device", o.device, {"cpu", "cuda"}, runtime, "(default cpu)");
  cli.choice("--dtype", o.dtype, {"float32", "float16", "bfloat16"}, runtime, "(default float32 on cpu, float16 on cuda)");
  cli.choice("--positions", o.positions, {"original", "cache"}, runtime,
             "original: every token keeps its index (the course project); cache:\n"
             "positions count each layer's slots (StreamingLLM); docs/ALGORITHMS.md");
  cli.choice("--schedule", o.schedule, {"every", "chunked"}, runtime,
             "the fixed-capacity in-place cache through the model's `step`,\n"
             "compressing every token or once per --slack tokens (default: the\n"
             "course project's concatenating loop)");
  cli.count("--slack", o.slack, 1, runtime, "tokens between compressions for --schedule chunked (default 64)");
  cli.flag("--cuda-graph", runtime, "replay each one-token step from a CUDA graph (implies --schedule every)",
           [&o] { o.cuda_graph = true; });
  cli.flag("--native-step", runtime,
           "one-token steps in kvcompress's own CUDA kernels instead of the model's\nTorchScript step (CUDA; the "
           "fixed-capacity cache, --schedule every\nunless given, and --no-one-pass; not for methods that score with\n"
           "attention or queries). On an H100 1.33x faster than the TorchScript step\nat one row; "
           "KVC_NATIVE_GEMV, KVC_NATIVE_PDL and KVC_NATIVE_CHUNK tune it\n(docs/PERFORMANCE.md)",
           [&o] { o.native_step = true; });
  cli.count("--batch", o.batch, 1, runtime, "rows of the generation measurement (default 1)");
  cli.count("--prefill-chunk", o.prefill_chunk, 0, runtime, "feed the generation prompt N tokens per step (default 0: at once)");
  cli.flag("--compress-prefill", runtime,
           "compress between the generation prompt's pieces (needs --prefill-chunk N):\na prompt far past the budget "
           "held in about budget + N slots; the kept\ntokens then differ from compressing once after the prompt",
           [&o] { o.compress_prefill = true; });
  cli.flag("--shared-prompt", runtime,
           "feed the generation prompt to one row, compress it and copy its cache\nto the others (--batch N > 1, "
           "fixed-capacity cache): one prefill for N\nsamples of one prompt, rows sized for the decode alone; TTFT "
           "then\ncounts one row's prefill",
           [&o] { o.shared_prompt = true; });
  cli.on_off("--one-pass",
             "evaluate every run as a row of one batched decode (fixed-capacity\n"
             "cache; default when two or more runs evaluate; contract version 5)",
             "--no-one-pass", "evaluate the runs one at a time", runtime, o.one_pass);
  cli.count("--workers", o.workers, 1, runtime,
            "host threads that share the one pass's model calls and compressions\n"
            "(default: the machine's cores on cpu, 1 on cuda)");
  cli.flag("--no-eval", runtime, "skip the perplexity evaluation (generation measurement only)", [&o] { o.eval = false; });
  cli.count("--generate", o.generate, 0, runtime, "new tokens of the timed greedy generation (default 32; 0 = off)");
  cli.count("--prompt-tokens", o.prompt_tokens, 1, runtime, "prompt length of the generation (default 512)");
  cli.count("--repeats", o.repeats, 1, runtime,
            "runs of every timed measurement: figures are their median, with min\nand max (default 3)");
  cli.flag("--throughput", runtime,
           "time decode throughput over --contexts x --batches for every run\n(tokens/s, peak memory) instead of "
           "the one generation; in this\nprocess (no --process-per-repeat)",
           [&o] { o.throughput = true; });
  cli.option("--contexts", "LIST", runtime, "prompt lengths of --throughput (default: --prompt-tokens)",
             [&o](const std::string& v) { o.contexts = parse_int_list("--contexts", v); });
  cli.option("--batches", "LIST", runtime, "batches of --throughput (default: --batch)",
             [&o](const std::string& v) { o.batches = parse_int_list("--batches", v); });
  cli.flag("--largest-batch", runtime,
           "--throughput also finds, per run and context, the largest batch that\nfits in memory (the device's, or "
           "--memory-limit) and measures it",
           [&o] { o.largest_batch = true; });
  cli.option("--memory-limit", "SIZE", runtime,
             "what a --throughput batch may peak at, e.g. 40GiB, 512MiB (cuda: the\nallocator's cap; cpu: the peak "
             "resident set; needed there for\n--largest-batch)",
             [&o](const std::string& v) { o.memory_limit = parse_size("--memory-limit", v); });
  cli.on_off("--process-per-repeat",
             "time each repeat in a fresh kvbench process, so the spread covers\n"
             "what differs between invocations (default on cpu; on cuda each\n"
             "process holds its own copy of the model)",
             "--no-process-per-repeat", "time every repeat in this process (default on cuda)", runtime,
             o.process_per_repeat);
  // Internal (no group: not in --help): set by kvbench on the processes it starts.
  cli.count("--generation-round-fd", o.generation_round_fd, 3, "",
            "this process times one generation round and writes it to descriptor N");
  cli.text("--generation-round-prompt", o.generation_round_prompt, "FILE", "",
           "that round's token ids (the first sample's first tokens), written by kvbench");
  cli.count("--threads", o.threads, 1, runtime, "CPU threads for LibTorch and its OpenBLAS, per one-pass worker\n(default: LibTorch's choice)");
  cli.flag("--jit-optimize", runtime, "let TorchScript fuse the model's elementwise ops (default with\n--cuda-graph)",
           [&o] { o.jit_optimize = 1; });
  cli.flag("--no-jit-optimize", runtime, "off also with --cuda-graph", [&o] { o.jit_optimize = 0; });

  cli.text("--out", o.out_dir, "DIR", output, "results folder (default results/<run name>): results.json,\nresults.csv, plots");
  cli.text("--run-name", o.run_name, "NAME", output, "name of the default results folder (default: what ran + time)");
  cli.flag("--no-results", output, "write no results folder (--json / --csv still do)", [&o] { o.results = false; });
  cli.text("--json", o.json, "FILE", output, "also write the results as JSON to FILE");
  cli.text("--csv", o.csv, "FILE", output, "also write the results as CSV to FILE");
  cli.text("--trace", o.trace, "FILE", output,
           "JSON lines: for every compression of the evaluation, the step, the\nlayer and the kept original positions "
           "(per head where heads differ)");
  cli.flag("--wide", output, "one table with every column (default: quality and speed tables)", [&o] { o.wide = true; });
  cli.flag("--quiet", output, "no progress on standard error", [&o] { o.quiet = true; });

  cli.parse(argc, argv);
  if (o.dtype.empty()) o.dtype = o.device == "cuda" ? "float16" : "float32";
  if (o.process_per_repeat < 0) o.process_per_repeat = o.device == "cpu" && !o.throughput ? 1 : 0;
  if (!o.texts.empty() && !o.token_files.empty()) fail("give either --text or --tokens, not both");
  if (o.cuda_graph && o.device != "cuda") fail("--cuda-graph needs --device cuda");
  if (o.cuda_graph && o.schedule.empty()) o.schedule = "every";
  if (o.native_step && o.device != "cuda")
    fail("--native-step needs --device cuda (the TorchScript step is the CPU's fast path; the native step's CPU form "
         "exists to test its arithmetic)");
  if (o.native_step && o.one_pass == 1)
    fail("--native-step cannot go with --one-pass: one-pass rows run their group's TorchScript step");
  if (o.native_step) {
    o.one_pass = 0;
    if (o.schedule.empty()) o.schedule = "every";
  }
  if (!o.eval && o.generate == 0) fail("--no-eval with --generate 0 leaves nothing to measure");
  if (o.shared_prompt && !o.static_cache())
    fail("--shared-prompt copies one row's fixed-capacity cache: it needs --schedule or --cuda-graph");
  if (o.compress_prefill && o.prefill_chunk == 0)
    fail("--compress-prefill compresses between the prompt's pieces: it needs --prefill-chunk N");
  if (o.recompute_reference && (!o.eval || o.window == 0))
    fail("--recompute-reference scores windows: it needs the evaluation and --window > 0");
  if ((o.compare_all || o.compare_attention) && o.budgets.empty()) fail("--budgets needs at least one budget");
  for (int64_t b : o.budgets)
    if (b < 16) fail("--budgets: each budget must be >= 16, got " + std::to_string(b));
  if (o.workers > 256) fail("--workers must be <= 256, got " + std::to_string(o.workers));
  if (o.workers > 1 && o.cuda_graph) fail("--workers " + std::to_string(o.workers) + " cannot go with --cuda-graph: "
                                          "graphs are captured on one stream, by one worker");
  if (o.one_pass == 1 && !o.eval) fail("--one-pass is a way to evaluate: it cannot go with --no-eval");
  if (!o.trace.empty() && !o.eval) fail("--trace records the evaluation's compressions: it cannot go with --no-eval");
  if (!o.throughput) {
    if (!o.contexts.empty()) fail("--contexts goes with --throughput");
    if (!o.batches.empty()) fail("--batches goes with --throughput");
    if (o.largest_batch) fail("--largest-batch goes with --throughput");
    if (o.memory_limit > 0) fail("--memory-limit goes with --throughput");
  } else {
    if (o.generate < 2) fail("--throughput times decode steps: it needs --generate 2 or more");
    if (o.process_per_repeat == 1)
      fail("--throughput times every point in this process (a batch that does not fit is an error it catches): "
           "it cannot go with --process-per-repeat");
    o.process_per_repeat = 0;
    if (o.contexts.empty()) o.contexts = {o.prompt_tokens};
    if (o.batches.empty()) o.batches = {o.batch};
    for (const auto* list : {&o.contexts, &o.batches})
      for (int64_t v : *list)
        if (v < 1) fail(std::string(list == &o.contexts ? "--contexts" : "--batches") + ": each must be >= 1, got " +
                        std::to_string(v));
    if (o.largest_batch && o.device == "cpu" && o.memory_limit == 0)
      fail("--largest-batch on the CPU needs --memory-limit: there a batch that does not fit is ended by the "
           "system's out-of-memory killer, not reported");
  }
  if (!o.results && (!o.out_dir.empty() || !o.run_name.empty())) fail("--no-results cannot go with --out or --run-name");
  if (!o.out_dir.empty() && !o.run_name.empty()) fail("give either --out or --run-name, not both");
  // Under the cache rule an uncompressed layer's positions grow with the text, past the
  // model's context: compress every layer unless told otherwise.
  if (o.positions == "cache" && !o.skip_layers_given) o.skip_layers.clear();
  return o;
}

// The course project's compare-all set at budget b (its 512 and 1024 rows, generalised).
inline std::vector<std::pair<std::string, std::string>> compare_all_methods(int64_t b) {
  const auto s = [](int64_t x) { return std::to_string(x); };
  const std::string tag = "_" + s(b);
  return {
      {"streaming_llm" + tag, "streaming_llm(start_size=4, recent_size=" + s(b - 4) + ")"},
      {"h2o_l2" + tag, "h2o_l2(start_size=4, heavy_hitter_size=" + s(b / 8) + ", recent_size=" + s(b - 4 - b / 8) + ")"},
      {"recent_only" + tag, "recent_only(window_size=" + s(b) + ")"},
      {"snapkv_lite" + tag, "snapkv_lite(observation_window=" + s(b / 16) + ", keep_size=" + s(b) + ")"},
      {"pyramid_kv" + tag, "pyramid_kv(base_size=" + s(b) + ", layer_decay=0.9, min_size=" + s(b / 8) + ")"},
      {"adaptive_l2" + tag, "adaptive_l2(target_size=" + s(b) + ", soft_limit=" + s(b / 2) + ", hard_limit=" + s(2 * b) + ")"},
      {"fix_size_l2" + tag, "fix_size_l2(fix_kv_size=" + s(b) + ", keep_ratio=0.5, strategy=keep_low)"},
  };
}

// Each attention-aware method beside its key-norm proxy at budget b: the same split of the
// budget (sinks, heavy hitters, recent; window, kept), so a row differs only in its scores.
inline std::vector<std::pair<std::string, std::string>> compare_attention_methods(int64_t b) {
  const auto s = [](int64_t x) { return std::to_string(x); };
  const std::string tag = "_" + s(b);
  const std::string h2o_split = "start_size=4, heavy_hitter_size=" + s(b / 8) + ", recent_size=" + s(b - 4 - b / 8);
  const std::string snap_split = "observation_window=" + s(std::max<int64_t>(b / 16, 1)) + ", keep_size=" + s(b);
  return {
      {"streaming_llm" + tag, "streaming_llm(start_size=4, recent_size=" + s(b - 4) + ")"},
      {"h2o_l2" + tag, "h2o_l2(" + h2o_split + ")"},
      {"h2o_attention" + tag, "h2o_attention(" + h2o_split + ", decay_factor=0.9)"},
      {"h2o" + tag, "h2o(heavy_hitter_size=" + s(b / 2) + ", recent_size=" + s(b - b / 2) + ")"},
      {"snapkv_lite" + tag, "snapkv_lite(" + snap_split + ")"},
      {"snapkv" + tag, "snapkv(" + snap_split + ")"},
      {"tova" + tag, "tova(cache_size=" + s(b) + ")"},
      // Per-head budgets over the same policies (b visible tokens per head on average; twice
      // the slots held, the rest hidden).
      {"adakv_h2o" + tag, "adakv_h2o(heavy_hitter_size=" + s(b / 2) + ", recent_size=" + s(b - b / 2) + ")"},
      {"adakv_snapkv" + tag, "adakv_snapkv(" + snap_split + ")"},
  };
}

/// One row of the report: a label and a compressor (null = the full cache) and what it measured.
struct Run {
  std::string label;
  std::unique_ptr<kvc::Compressor> compressor;
  rt::RunMetrics metrics;   ///< the evaluation (quality; its step times)
  bool recompute = false;  ///< the sliding-window re-computation oracle (no cache)
  std::vector<rt::RunMetrics> generations;  ///< one per repeat of the generation measurement
  double seconds = 0;                       ///< wall time of the whole run (evaluation and generation)
  double generation_seconds = 0;            ///< its generation rounds' share, added to seconds at the end
  int64_t generation_peak_bytes = -1;       ///< the largest peak of its generation rounds
  int64_t held_before_bytes = 0;            ///< device memory earlier runs still held when this one ran
};

inline std::vector<Run> make_runs(const Options& o) {
  std::vector<Run> runs;
  if (o.baseline) runs.push_back({"baseline", nullptr, {}});
  if (o.recompute_reference) runs.push_back({"recompute", nullptr, {}, true, {}});  // label gets the context later
  std::vector<std::pair<std::string, std::string>> methods = o.methods;
  for (int64_t b : o.budgets) {
    if (o.compare_all)
      for (auto& m : compare_all_methods(b)) methods.push_back(m);
    if (o.compare_attention)  // rows --compare-all already has are not repeated
      for (auto& m : compare_attention_methods(b))
        if (std::find(methods.begin(), methods.end(), m) == methods.end()) methods.push_back(m);
  }
  std::map<std::string, int> seen;
  for (const auto& [label, spec] : methods) {
    auto c = kvc::make_compressor(kvtools::with_skip_layers(kvc::parse_spec(spec), o.skip_layers));
    std::string name = label.empty() ? c->name() : label;
    if (++seen[name] > 1) name += "_" + std::to_string(seen[name]);
    runs.push_back({name, std::move(c), {}, false, {}});
  }
  if (runs.empty()) fail("nothing to run: give --method, --compare-all, --compare-attention, or drop --no-baseline");
  return runs;
}

}  // namespace kvbench
