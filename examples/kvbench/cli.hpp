#pragma once
// kvbench's command line: the options, their parsing and checks, and the runs they ask for.
#include <kvcompress/kvcompress.hpp>
#include <kvcompress/runtime/evaluate.hpp>

#include <algorithm>
#include <cstdlib>
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

inline const char* kUsage = R"(usage: kvbench [options]

Evaluates a contract TorchScript model token by token (feed token t, score token t+1, compress
the cache) for the full cache and each method, as the course project did.

  --model FILE          contract model (default: the bundled data/pg19-neox-tiny.pt)
  --text FILE           UTF-8 text, tokenized with the tokenizer the model embeds (SentencePiece,
                        or a Pythia export's tokenizer.json) (repeatable; whole bundled books:
                        data/books/*.txt)
  --tokens FILE         token ids (kvtok --encode, or examples/python/tokenize_text.py) (repeatable)
                        default input: the bundled eval excerpts (data/eval_text or data/eval_tokens)
  --samples N           number of inputs to evaluate, one sample each (default: every input
                        given; 2 of the bundled excerpts)
  --max-tokens N        first N tokens of each sample (default 2000; 0 = the whole text)
  --window N            also report quality per N-token window (JSON "windows"; default 1024
                        when a sample is longer than the model's context, else off; 0 = off)
  --recompute-reference  also the oracle of long texts: each window scored by a fresh forward
                        over the model's context ending there (StreamingLLM's sliding window
                        with re-computation); a row "recompute_<context>" (needs windows)
  --device cpu|cuda     (default cpu)
  --dtype float32|float16|bfloat16   (default float32 on cpu, float16 on cuda)
  --method SPEC         a method, e.g. 'h2o_l2(heavy_hitter_size=128)'; repeatable; a label
                        can be given as LABEL=SPEC
  --compare-all         the course project's set of seven methods at each budget
  --compare-attention   the attention-aware methods beside their key-norm proxies at each budget:
                        h2o_l2 | h2o_attention (same split) | h2o, snapkv_lite | snapkv (same
                        window), tova, per-head budgets adakv_h2o and adakv_snapkv, and
                        streaming_llm as the score-free reference
  --budgets LIST        budgets for --compare-all / --compare-attention (default 512,1024)
  --skip-layers LIST    layers left uncompressed, applied to every method whose spec does
                        not set skip_layers itself (default 0,1 with positions original, as
                        the course project; none with positions cache; '' for none)
  --no-baseline         skip the full-cache run
  --positions original|cache   position rule (default original): every token keeps its
                        absolute index, as the course project did; or `cache`: positions count
                        each layer's cache slots, kept keys re-rotated after each compression
                        (StreamingLLM); see docs/ALGORITHMS.md
  --schedule every|chunked   use the fixed-capacity in-place cache through the model's `step`:
                        compress after every token, or once per --slack tokens (default: the
                        course project's loop, which re-concatenates the cache every step)
  --slack N             tokens between compressions for --schedule chunked (default 64)
  --prefill-chunk N     feed the generation prompt N tokens per step (default 0 = all at once):
                        lowers the prefill's peak memory
  --cuda-graph          replay each one-token step from a CUDA graph (fixed-capacity cache;
                        implies --schedule every unless given)
  --batch N             rows of the generation measurement (default 1)
  --no-eval             skip the perplexity evaluation (generation measurement only)
  --generate N          greedy generation measurement: N new tokens (default 32; 0 = off)
  --prompt-tokens N     prompt length for the generation measurement (default 512)
  --threads N           CPU threads for LibTorch (default: LibTorch's choice)
  --jit-optimize        let TorchScript's profiling executor fuse the model's elementwise ops
                        (default with --cuda-graph, whose captured step has one fixed shape;
                        off otherwise: re-specialising on new shapes stalls single steps)
  --no-jit-optimize     off also with --cuda-graph
  --json FILE           write results as JSON
  --csv FILE            write results as CSV
  --save-tokens DIR     write each sample's token ids, as evaluated, to DIR/<input stem>.ids
  --quiet               no progress bar
  --list-methods        print the registered methods and exit
  --help
)";

[[noreturn]] inline void fail(const std::string& msg) { throw kvc::Error(msg); }

inline int64_t parse_count(const std::string& flag, const std::string& v, int64_t min) {
  int64_t x = 0;
  if (!kvc::params::parse_int(v, x) || x < min)
    fail(flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'");
  return x;
}

// `flag`'s value must be one of `options`: "--dtype must be float32, float16 or bfloat16, got 'x'".
inline std::string parse_choice(const std::string& flag, const std::string& v,
                                std::initializer_list<const char*> options) {
  std::string listed;
  size_t i = 0;
  for (const char* opt : options) {
    if (v == opt) return v;
    listed += (i == 0 ? "" : i + 1 == options.size() ? " or " : ", ") + std::string(opt);
    ++i;
  }
  fail(flag + " must be " + listed + ", got '" + v + "'");
}

inline std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& v) {
  std::vector<int64_t> out;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(std::remove_if(item.begin(), item.end(), ::isspace), item.end());
    if (item.empty()) continue;
    out.push_back(parse_count(flag, item, 0));
  }
  return out;
}

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
  bool cuda_graph = false, eval = true, skip_layers_given = false;
  std::vector<int64_t> budgets = {512, 1024}, skip_layers = {0, 1};
  std::string json, csv, save_tokens;

  bool static_cache() const { return !schedule.empty() || cuda_graph; }
  rt::PositionRule rule() const { return positions == "cache" ? rt::PositionRule::cache : rt::PositionRule::original; }
  kvc::Schedule compression_schedule() const {
    return schedule == "chunked" ? kvc::Schedule::chunk(slack) : kvc::Schedule::every();
  }
};

inline Options parse_args(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) fail(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") { std::cout << kUsage; std::exit(0); }
    else if (a == "--list-methods") {
      for (const auto& m : kvc::list_methods()) std::cout << kvc::make_compressor(m)->spec() << '\n';
      std::exit(0);
    }
    else if (a == "--model") o.model = value(i);
    else if (a == "--text") o.texts.push_back(value(i));
    else if (a == "--tokens") o.token_files.push_back(value(i));
    else if (a == "--samples") o.samples = parse_count(a, value(i), 1);
    else if (a == "--max-tokens") {
      o.max_tokens = parse_count(a, value(i), 0);
      if (o.max_tokens == 1) fail("--max-tokens must be 0 (the whole text) or >= 2, got 1");
    }
    else if (a == "--window") o.window = parse_count(a, value(i), 0);
    else if (a == "--recompute-reference") o.recompute_reference = true;
    else if (a == "--device") o.device = parse_choice(a, value(i), {"cpu", "cuda"});
    else if (a == "--dtype") o.dtype = parse_choice(a, value(i), {"float32", "float16", "bfloat16"});
    else if (a == "--method") {
      const std::string v = value(i);
      const auto eq = v.find('='), paren = v.find('(');
      if (eq != std::string::npos && (paren == std::string::npos || eq < paren))
        o.methods.emplace_back(v.substr(0, eq), v.substr(eq + 1));
      else
        o.methods.emplace_back("", v);
    }
    else if (a == "--compare-all") o.compare_all = true;
    else if (a == "--compare-attention") o.compare_attention = true;
    else if (a == "--budgets") o.budgets = parse_int_list(a, value(i));
    else if (a == "--skip-layers") { o.skip_layers = parse_int_list(a, value(i)); o.skip_layers_given = true; }
    else if (a == "--no-baseline") o.baseline = false;
    else if (a == "--positions") o.positions = parse_choice(a, value(i), {"original", "cache"});
    else if (a == "--generate") o.generate = parse_count(a, value(i), 0);
    else if (a == "--prompt-tokens") o.prompt_tokens = parse_count(a, value(i), 1);
    else if (a == "--threads") o.threads = parse_count(a, value(i), 1);
    else if (a == "--json") o.json = value(i);
    else if (a == "--csv") o.csv = value(i);
    else if (a == "--save-tokens") o.save_tokens = value(i);
    else if (a == "--quiet") o.quiet = true;
    else if (a == "--jit-optimize") o.jit_optimize = 1;
    else if (a == "--no-jit-optimize") o.jit_optimize = 0;
    else if (a == "--schedule") o.schedule = parse_choice(a, value(i), {"every", "chunked"});
    else if (a == "--slack") o.slack = parse_count(a, value(i), 1);
    else if (a == "--prefill-chunk") o.prefill_chunk = parse_count(a, value(i), 0);
    else if (a == "--cuda-graph") o.cuda_graph = true;
    else if (a == "--batch") o.batch = parse_count(a, value(i), 1);
    else if (a == "--no-eval") o.eval = false;
    else fail("unknown option '" + a + "' (see kvbench --help)");
  }
  if (o.dtype.empty()) o.dtype = o.device == "cuda" ? "float16" : "float32";
  if (!o.texts.empty() && !o.token_files.empty()) fail("give either --text or --tokens, not both");
  if (o.cuda_graph && o.device != "cuda") fail("--cuda-graph needs --device cuda");
  if (o.cuda_graph && o.schedule.empty()) o.schedule = "every";
  if (!o.eval && o.generate == 0) fail("--no-eval with --generate 0 leaves nothing to measure");
  if (o.recompute_reference && (!o.eval || o.window == 0))
    fail("--recompute-reference scores windows: it needs the evaluation and --window > 0");
  if ((o.compare_all || o.compare_attention) && o.budgets.empty()) fail("--budgets needs at least one budget");
  for (int64_t b : o.budgets)
    if (b < 16) fail("--budgets: each budget must be >= 16, got " + std::to_string(b));
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
  rt::RunMetrics metrics;
  bool recompute = false;  ///< the sliding-window re-computation oracle (no cache)
};

inline std::vector<Run> make_runs(const Options& o) {
  std::vector<Run> runs;
  if (o.baseline) runs.push_back({"baseline", nullptr, {}});
  if (o.recompute_reference) runs.push_back({"recompute", nullptr, {}, true});  // label gets the context later
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
    kvc::ParsedSpec parsed = kvc::parse_spec(spec);
    if (!parsed.args.count("skip_layers")) {  // the benchmark's skip_layers, as the course did
      kvc::params::SpecValue v;
      v.is_list = true;
      for (int64_t l : o.skip_layers) v.items.push_back(std::to_string(l));
      parsed.args["skip_layers"] = v;
    }
    auto c = kvc::make_compressor(parsed);
    std::string name = label.empty() ? c->name() : label;
    if (++seen[name] > 1) name += "_" + std::to_string(seen[name]);
    runs.push_back({name, std::move(c), {}});
  }
  if (runs.empty()) fail("nothing to run: give --method, --compare-all, --compare-attention, or drop --no-baseline");
  return runs;
}

}  // namespace kvbench
