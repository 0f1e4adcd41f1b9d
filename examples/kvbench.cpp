// kvbench: runs a contract TorchScript model (docs/MODEL_CONTRACT.md) token by token over text
// and reports, for the full cache and every requested compression method, perplexity,
// next-token accuracy, TTFT, TPOT, throughput, cache size and peak memory; plus a greedy
// generation measurement. `kvbench --help` lists the options.
#include <kvcompress/kvcompress.hpp>
#include <kvcompress/runtime/evaluate.hpp>

#include <ATen/Parallel.h>

#include <kvcompress/runtime/sentencepiece_bpe.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
namespace kvc = kvcompress;
namespace rt = kvcompress::runtime;

#ifndef KVC_DATA_DIR
#define KVC_DATA_DIR "data"
#endif

namespace {

const char* kUsage = R"(usage: kvbench [options]

Evaluates a contract TorchScript model token by token (feed token t, score token t+1, compress
the cache) for the full cache and each method, as the course project did.

  --model FILE          contract model (default: the bundled data/pg19-neox-tiny.pt)
  --text FILE           raw text, tokenized with the model's SentencePiece tokenizer (repeatable)
  --tokens FILE         pre-tokenized ids (examples/python/tokenize_text.py) (repeatable)
                        default input: the bundled eval books (data/eval_text or data/eval_tokens)
  --samples N           number of inputs to evaluate, one sample each (default 2)
  --max-tokens N        first N tokens of each sample (default 2000)
  --device cpu|cuda     (default cpu)
  --dtype float32|float16|bfloat16   (default float32 on cpu, float16 on cuda)
  --method SPEC         a method, e.g. 'h2o_l2(heavy_hitter_size=128)'; repeatable; a label
                        can be given as LABEL=SPEC
  --compare-all         the course project's set of seven methods at each budget
  --budgets LIST        budgets for --compare-all (default 512,1024)
  --skip-layers LIST    layers left uncompressed, applied to every method whose spec does
                        not set skip_layers itself (default 0,1; '' for none)
  --no-baseline         skip the full-cache run
  --positions original|cache   position rule (default original): every token keeps its
                        absolute index, as the course project did; or `cache`: distances count
                        cache slots, kept keys re-rotated after each compression (StreamingLLM);
                        see docs/ALGORITHMS.md
  --schedule every|chunked   use the fixed-capacity in-place cache through the model's `step`:
                        compress after every token, or once per --slack tokens (default: the
                        course project's loop, which re-concatenates the cache every step)
  --slack N             tokens between compressions for --schedule chunked (default 64)
  --prefill-chunk N     feed the generation prompt N tokens per step (fixed-capacity runtime;
                        default 0 = all at once): lowers the prefill's peak memory
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
  --quiet               no progress bar
  --list-methods        print the registered methods and exit
  --help
)";

[[noreturn]] void fail(const std::string& msg) { throw kvc::Error(msg); }

int64_t parse_count(const std::string& flag, const std::string& v, int64_t min) {
  int64_t x = 0;
  if (!kvc::params::parse_int(v, x) || x < min)
    fail(flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'");
  return x;
}

// `flag`'s value must be one of `options`: "--dtype must be float32, float16 or bfloat16, got 'x'".
std::string parse_choice(const std::string& flag, const std::string& v, std::initializer_list<const char*> options) {
  std::string listed;
  size_t i = 0;
  for (const char* opt : options) {
    if (v == opt) return v;
    listed += (i == 0 ? "" : i + 1 == options.size() ? " or " : ", ") + std::string(opt);
    ++i;
  }
  fail(flag + " must be " + listed + ", got '" + v + "'");
}

std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& v) {
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
  int64_t samples = 2, max_tokens = 2000, generate = 32, prompt_tokens = 512, threads = 0;
  std::string device = "cpu", dtype;
  std::vector<std::pair<std::string, std::string>> methods;  // label, spec
  bool compare_all = false, baseline = true, quiet = false;
  int jit_optimize = -1;  // -1: on with --cuda-graph
  std::string schedule;  // "" = dynamic (concatenating) runtime
  std::string positions = "original";
  int64_t slack = 64, batch = 1, prefill_chunk = 0;
  bool cuda_graph = false, eval = true;
  bool static_cache() const { return !schedule.empty() || cuda_graph; }
  std::vector<int64_t> budgets = {512, 1024}, skip_layers = {0, 1};
  std::string json, csv;
};

Options parse_args(int argc, char** argv) {
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
    else if (a == "--max-tokens") o.max_tokens = parse_count(a, value(i), 2);
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
    else if (a == "--budgets") { o.budgets = parse_int_list(a, value(i)); }
    else if (a == "--skip-layers") o.skip_layers = parse_int_list(a, value(i));
    else if (a == "--no-baseline") o.baseline = false;
    else if (a == "--positions") o.positions = parse_choice(a, value(i), {"original", "cache"});
    else if (a == "--generate") o.generate = parse_count(a, value(i), 0);
    else if (a == "--prompt-tokens") o.prompt_tokens = parse_count(a, value(i), 1);
    else if (a == "--threads") o.threads = parse_count(a, value(i), 1);
    else if (a == "--json") o.json = value(i);
    else if (a == "--csv") o.csv = value(i);
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
  if (o.batch > 1 && !o.static_cache()) fail("--batch needs the fixed-capacity runtime (--schedule or --cuda-graph)");
  if (o.prefill_chunk > 0 && !o.static_cache())
    fail("--prefill-chunk needs the fixed-capacity runtime (--schedule or --cuda-graph)");
  if (o.positions == "cache" && o.static_cache())
    fail("--positions cache is implemented for the concatenating runtime only (drop --schedule/--cuda-graph)");
  if (o.compare_all && o.budgets.empty()) fail("--budgets needs at least one budget");
  for (int64_t b : o.budgets)
    if (b < 16) fail("--budgets: each budget must be >= 16, got " + std::to_string(b));
  return o;
}

// The course project's compare-all set at budget b (its 512 and 1024 rows, generalised).
std::vector<std::pair<std::string, std::string>> compare_all_methods(int64_t b) {
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

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(std::string(what) + " file not found or unreadable: " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Token-ids file: "# kvcompress-tokens v1 ..." then whitespace-separated decimal ids.
std::vector<int64_t> read_token_file(const std::string& path) {
  const std::string text = read_file(path, "token");
  std::istringstream in(text);
  std::string header;
  std::getline(in, header);
  if (header.rfind("# kvcompress-tokens v1", 0) != 0)
    fail("token file " + path + " does not start with '# kvcompress-tokens v1' (make it with "
         "examples/python/tokenize_text.py)");
  std::vector<int64_t> ids;
  std::string word;
  while (in >> word) {
    int64_t id = 0;
    if (!kvc::params::parse_int(word, id))
      fail("token file " + path + ": '" + word + "' is not a token id (entry " + std::to_string(ids.size()) + ")");
    ids.push_back(id);
  }
  return ids;
}

std::vector<int64_t> tokenize_text(const std::string& path, const std::string& spm_model) {
  const std::string text = read_file(path, "text");
  if (spm_model.empty())
    fail("the model has no SentencePiece tokenizer; pre-tokenize " + path +
         " with examples/python/tokenize_text.py and pass --tokens");
  return rt::SentencePieceBPE(spm_model).encode(text);
}

std::vector<std::string> sorted_files(const std::string& dir, const std::string& ext) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ext) out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

struct Sample {
  std::string source;
  std::vector<int64_t> tokens;
};

std::vector<Sample> load_samples(Options& o, const rt::ContractModel& model) {
  if (o.texts.empty() && o.token_files.empty()) {
    const bool use_text = !model.tokenizer_model().empty();
    if (use_text) o.texts = sorted_files(std::string(KVC_DATA_DIR) + "/eval_text", ".txt");
    else o.token_files = sorted_files(std::string(KVC_DATA_DIR) + "/eval_tokens", ".ids");
    if (o.texts.empty() && o.token_files.empty())
      fail("no input given and no bundled eval data found under " + std::string(KVC_DATA_DIR));
  }
  const auto& inputs = o.texts.empty() ? o.token_files : o.texts;
  if (static_cast<int64_t>(inputs.size()) < o.samples)
    fail("--samples " + std::to_string(o.samples) + " but only " + std::to_string(inputs.size()) +
         " input file(s)");
  std::vector<Sample> samples;
  for (int64_t s = 0; s < o.samples; ++s) {
    const std::string& path = inputs[static_cast<size_t>(s)];
    std::vector<int64_t> ids = o.texts.empty() ? read_token_file(path) : tokenize_text(path, model.tokenizer_model());
    if (static_cast<int64_t>(ids.size()) > o.max_tokens) ids.resize(static_cast<size_t>(o.max_tokens));
    if (ids.size() < 2) fail("input " + path + " has fewer than 2 tokens");
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= model.info().vocab_size)
        fail("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) + " of " + path +
             " is outside the model's vocabulary [0, " + std::to_string(model.info().vocab_size) + ")");
    samples.push_back({path, std::move(ids)});
  }
  return samples;
}

struct Run {
  std::string label;
  std::unique_ptr<kvc::Compressor> compressor;  // null = full cache
  rt::RunMetrics metrics;
};

std::vector<Run> make_runs(const Options& o) {
  std::vector<Run> runs;
  if (o.baseline) runs.push_back({"baseline", nullptr, {}});
  std::vector<std::pair<std::string, std::string>> methods = o.methods;
  if (o.compare_all)
    for (int64_t b : o.budgets)
      for (auto& m : compare_all_methods(b)) methods.push_back(m);
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
  if (runs.empty()) fail("nothing to run: give --method, --compare-all, or drop --no-baseline");
  return runs;
}

class ProgressBar {
 public:
  // On a terminal the bar redraws in place; in a log, one line per finished sample.
  ProgressBar(bool enabled) : enabled_(enabled), tty_(isatty(2) != 0) {}
  void update(const std::string& label, int64_t run, int64_t runs, int64_t sample, int64_t samples,
              int64_t done, int64_t total) {
    if (!enabled_) return;
    const int64_t pct = done * 100 / std::max<int64_t>(total, 1);
    if (done != total && (pct == last_pct_ || !tty_)) return;
    last_pct_ = pct;
    const int width = 30, fill = static_cast<int>(pct * width / 100);
    std::fprintf(stderr, "%s[%2lld/%lld] %-20s sample %lld/%lld [%s%s] %3lld%%", tty_ ? "\r" : "", (long long)run,
                 (long long)runs, label.c_str(), (long long)sample, (long long)samples,
                 std::string(fill, '#').c_str(), std::string(width - fill, '.').c_str(), (long long)pct);
    if (done == total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }
  void reset() { last_pct_ = -1; }

 private:
  bool enabled_, tty_;
  int64_t last_pct_ = -1;
};

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out;
}

std::string num(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

// Evaluation metrics are null when the evaluation did not run (--no-eval).
std::string eval_num(const rt::RunMetrics& m, double x) { return m.scored > 0 ? num(x) : "null"; }

void write_json(const std::string& path, const Options& o, const rt::ContractModel& model,
                const std::vector<Sample>& samples, const std::vector<Run>& runs) {
  std::ofstream out(path);
  if (!out) fail("cannot write --json file " + path);
  int64_t tokens = 0;
  for (const auto& s : samples) tokens += static_cast<int64_t>(s.tokens.size());
  out << "{\n  \"model\": \"" << json_escape(model.info().name) << "\",\n"
      << "  \"model_file\": \"" << json_escape(o.model) << "\",\n"
      << "  \"device\": \"" << json_escape(model.device().str()) << "\",\n"
      << "  \"dtype\": \"" << o.dtype << "\",\n"
      << "  \"tokens\": " << tokens << ",\n"
      << "  \"samples\": " << samples.size() << ",\n"
      << "  \"max_tokens\": " << o.max_tokens << ",\n"
      << "  \"positions\": \"" << o.positions << "\",\n"
      << "  \"runtime\": \"" << (o.static_cache() ? "static" : "dynamic") << "\",\n"
      << "  \"schedule\": \"" << (o.static_cache() ? o.schedule : "every") << "\",\n"
      << "  \"slack\": " << (o.schedule == "chunked" ? o.slack : 0) << ",\n"
      << "  \"prefill_chunk\": " << o.prefill_chunk << ",\n"
      << "  \"cuda_graph\": " << (o.cuda_graph ? "true" : "false") << ",\n"
      << "  \"jit_optimize\": " << (torch::jit::getGraphExecutorOptimize() ? "true" : "false") << ",\n"
      << "  \"skip_layers\": " << kvc::params::format_int_list(o.skip_layers) << ",\n"
      << "  \"inputs\": [";
  for (size_t i = 0; i < samples.size(); ++i) out << (i ? ", " : "") << '"' << json_escape(samples[i].source) << '"';
  out << "],\n  \"results\": [\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    const auto& m = r.metrics;
    out << "    {\"label\": \"" << json_escape(r.label) << "\", \"spec\": "
        << (r.compressor ? "\"" + json_escape(r.compressor->spec()) + "\"" : std::string("null"))
        << ", \"ppl\": " << eval_num(m, m.ppl()) << ", \"accuracy\": " << eval_num(m, m.accuracy())
        << ", \"ttft_s\": " << eval_num(m, m.ttft_s()) << ", \"tpot_s\": " << eval_num(m, m.tpot_s())
        << ", \"throughput_tok_s\": " << eval_num(m, m.throughput_tok_s())
        << ", \"cache_tokens\": " << m.cache_tokens << ", \"cache_bytes\": " << m.cache_bytes
        << ", \"peak_memory_bytes\": " << m.peak_memory_bytes << ", \"scored_tokens\": " << m.scored;
    if (o.generate > 0)
      out << ", \"generation\": {\"batch\": " << m.gen_batch << ", \"prompt_tokens\": " << o.prompt_tokens
          << ", \"new_tokens\": " << m.gen_tokens << ", \"tok_s\": " << num(m.gen_tok_s())
          << ", \"ttft_s\": " << num(m.gen_ttft_s) << ", \"tpot_s\": " << num(m.gen_tpot_s())
          << ", \"tpot_first_half_s\": " << num(m.gen_tpot_half_s(false))
          << ", \"tpot_second_half_s\": " << num(m.gen_tpot_half_s(true))
          << ", \"compress_s\": " << num(m.gen_compress_s) << ", \"compress_share\": " << num(m.gen_compress_share())
          << ", \"cache_tokens\": " << m.gen_cache_tokens << "}";
    out << "}" << (i + 1 < runs.size() ? "," : "") << "\n";
  }
  out << "  ]\n}\n";
}

void write_csv(const std::string& path, const Options& o, const std::vector<Run>& runs) {
  std::ofstream out(path);
  if (!out) fail("cannot write --csv file " + path);
  out << "label,spec,ppl,accuracy,ttft_s,tpot_s,throughput_tok_s,cache_tokens,cache_bytes,peak_memory_bytes";
  if (o.generate > 0) out << ",gen_ttft_s,gen_tpot_s,gen_compress_share";
  out << "\n";
  for (const auto& r : runs) {
    const auto& m = r.metrics;
    out << r.label << ",\"" << (r.compressor ? r.compressor->spec() : "") << "\"," << num(m.ppl()) << ','
        << num(m.accuracy()) << ',' << num(m.ttft_s()) << ',' << num(m.tpot_s()) << ','
        << num(m.throughput_tok_s()) << ',' << m.cache_tokens << ',' << m.cache_bytes << ','
        << m.peak_memory_bytes;
    if (o.generate > 0) out << ',' << num(m.gen_ttft_s) << ',' << num(m.gen_tpot_s()) << ',' << num(m.gen_compress_share());
    out << "\n";
  }
}

void print_table(const Options& o, const std::vector<Run>& runs) {
  std::printf("%-22s %9s %8s %9s %9s %9s %7s %10s %10s", "method", "PPL", "acc", "TTFT ms", "TPOT ms",
              "tok/s", "cache", "cache MB", "peak MB");
  if (o.generate > 0) std::printf(" %11s %11s %9s %7s %8s", "gen TTFT ms", "gen TPOT ms", "gen tok/s", "comp %", "2nd/1st");
  std::printf("\n");
  for (const auto& r : runs) {
    const auto& m = r.metrics;
    if (m.scored > 0)
      std::printf("%-22s %9.3f %8.4f %9.3f %9.3f %9.1f %7lld %10.2f", r.label.c_str(), m.ppl(), m.accuracy(),
                  m.ttft_s() * 1e3, m.tpot_s() * 1e3, m.throughput_tok_s(), (long long)m.cache_tokens,
                  m.cache_bytes / 1048576.0);
    else  // --no-eval: only the generation measurement ran
      std::printf("%-22s %9s %8s %9s %9s %9s %7lld %10s", r.label.c_str(), "-", "-", "-", "-", "-",
                  (long long)m.gen_cache_tokens, "-");
    std::printf(" %10.1f", m.peak_memory_bytes < 0 ? -1.0 : m.peak_memory_bytes / 1048576.0);
    if (o.generate > 0) {
      const double first = m.gen_tpot_half_s(false);
      std::printf(" %11.3f %11.3f %9.1f %7.2f %8.3f", m.gen_ttft_s * 1e3, m.gen_tpot_s() * 1e3, m.gen_tok_s(),
                  100.0 * m.gen_compress_share(), first > 0 ? m.gen_tpot_half_s(true) / first : 0.0);
    }
    std::printf("\n");
  }
}

int run(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  if (o.threads > 0) at::set_num_threads(static_cast<int>(o.threads));
  torch::jit::setGraphExecutorOptimize(o.jit_optimize == 1 || (o.jit_optimize < 0 && o.cuda_graph));
  at::Device device(at::kCPU);
  if (o.device == "cuda") {
    if (!at::hasCUDA()) fail("--device cuda: no CUDA device is available (or this LibTorch has no CUDA)");
    device = at::Device(at::kCUDA, 0);
  }
  const at::ScalarType dtype = o.dtype == "float16" ? at::kHalf : o.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  std::vector<Run> runs = make_runs(o);  // spec errors before the (slow) model load
  rt::ContractModel model = rt::ContractModel::load(o.model, device, dtype);
  std::vector<Sample> samples = load_samples(o, model);
  int64_t total_tokens = 0;
  for (const auto& s : samples) total_tokens += static_cast<int64_t>(s.tokens.size());
  const auto& info = model.info();
  std::printf("model %s (%lld layers, %lld heads, head_dim %lld, vocab %lld) on %s/%s\n", info.name.c_str(),
              (long long)info.num_layers, (long long)info.num_heads, (long long)info.head_dim,
              (long long)info.vocab_size, device.str().c_str(), o.dtype.c_str());
  std::printf("%zu sample(s), %lld tokens, positions=%s, skip_layers=%s, runtime=%s\n", samples.size(),
              (long long)total_tokens, o.positions.c_str(), kvc::params::format_int_list(o.skip_layers).c_str(),
              !o.static_cache() ? "dynamic (concatenating cache)"
              : (std::string("static, schedule ") + o.schedule + (o.schedule == "chunked" ? " slack " + std::to_string(o.slack) : "") +
                 (o.cuda_graph ? ", CUDA graph" : "")).c_str());
  if (o.max_tokens > info.max_positions)
    std::fprintf(stderr, "kvbench: warning: --max-tokens %lld exceeds the model's max_positions %lld\n",
                 (long long)o.max_tokens, (long long)info.max_positions);

  std::vector<int64_t> prompt;
  if (o.generate > 0) {
    const auto& first = samples.front().tokens;
    prompt.assign(first.begin(), first.begin() + std::min<int64_t>(o.prompt_tokens, first.size()));
    o.prompt_tokens = static_cast<int64_t>(prompt.size());
  }

  const kvc::PositionRule rule = o.positions == "cache" ? kvc::PositionRule::cache : kvc::PositionRule::original;
  rt::StaticOptions so;
  so.schedule = o.schedule == "chunked" ? kvc::Schedule::chunk(o.slack) : kvc::Schedule::every();
  so.prefill_chunk = o.prefill_chunk;
  so.cuda_graph = o.cuda_graph;
  auto evaluate = [&](const kvc::Compressor* c, const std::vector<int64_t>& tokens, rt::RunMetrics& m,
                      const rt::Progress& progress) {
    if (o.static_cache()) rt::evaluate_sample_static(model, c, tokens, m, so, o.skip_layers, progress);
    else rt::evaluate_sample(model, c, tokens, m, o.skip_layers, progress, rule);
  };
  auto generate = [&](const kvc::Compressor* c, int64_t n, rt::RunMetrics& m) {
    if (o.static_cache()) rt::measure_generation_static(model, c, prompt, n, o.batch, m, so, o.skip_layers);
    else rt::measure_generation(model, c, prompt, n, m, o.skip_layers, rule);
  };
  {  // Untimed warm-up of both call shapes (one token; a prompt), so the first timed run does
     // not pay for LibTorch's and the GPU's first-call costs.
    rt::RunMetrics scratch;
    const auto& first = samples.front().tokens;
    evaluate(nullptr, std::vector<int64_t>(first.begin(), first.begin() + std::min<size_t>(8, first.size())), scratch, nullptr);
    if (o.generate > 0) generate(nullptr, 2, scratch);
  }
  ProgressBar bar(!o.quiet);
  rt::PeakMemory memory(device);
  for (size_t r = 0; r < runs.size(); ++r) {
    Run& run = runs[r];
    memory.reset();
    for (size_t s = 0; o.eval && s < samples.size(); ++s) {
      bar.reset();
      evaluate(run.compressor.get(), samples[s].tokens, run.metrics, [&](int64_t done, int64_t total) {
        bar.update(run.label, r + 1, runs.size(), s + 1, samples.size(), done, total);
      });
    }
    if (o.generate > 0) generate(run.compressor.get(), o.generate, run.metrics);
    run.metrics.peak_memory_bytes = memory.peak_bytes();
  }
  print_table(o, runs);
  if (!o.json.empty()) write_json(o.json, o, model, samples, runs);
  if (!o.csv.empty()) write_csv(o.csv, o, runs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvbench: error: %s\n", rt::first_line(e).c_str());
    return 2;
  }
}
