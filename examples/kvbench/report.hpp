#pragma once
// kvbench's output: progress on standard error; each run's line as it finishes, then the
// quality and speed tables, on standard output; the results folder (JSON, CSV, plots) and the
// files asked for (--json, --csv, --trace).
#include "cli.hpp"
#include "inputs.hpp"

#include <kvcompress/runtime/evaluate.hpp>
#include <kvcompress/runtime/model.hpp>

#include <nlohmann/json.hpp>
#include <torch/script.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include <unistd.h>

namespace kvbench {

using Json = nlohmann::ordered_json;

constexpr double kMiB = 1048576.0;  // every size on screen and in the plots is in MiB (2^20 bytes)

/// A timing over repeated runs: the median (what tables and JSON show as the figure), with the
/// fastest and slowest run beside it. NaN (JSON null) when nothing was measured.
struct Spread {
  double median = std::numeric_limits<double>::quiet_NaN(), min = median, max = median;
  static Spread of(std::vector<double> v) {
    Spread s;
    v.erase(std::remove_if(v.begin(), v.end(), [](double x) { return !std::isfinite(x); }), v.end());
    if (v.empty()) return s;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    s.median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    s.min = v.front();
    s.max = v.back();
    return s;
  }
  bool measured() const { return std::isfinite(median); }
};

/// The timed figures of one run, each over the repeats of the generation measurement.
struct Timings {
  Spread ttft, tpot, tok_s, first_half, second_half, compress_s, compress_share;
  Spread eval_step;  ///< the evaluation's step (one pass per sample: min/max over samples)
  int64_t repeats = 0;
  /// Median decode step of the second half over the first: 1 = TPOT flat in generated tokens.
  double second_over_first() const {
    return first_half.median > 0 ? second_half.median / first_half.median : std::numeric_limits<double>::quiet_NaN();
  }
};

/// Tokens the run's cache kept: the evaluation's, or the generation's when only that ran.
inline int64_t kept_tokens(const Run& r) {
  return r.metrics.scored > 0 || r.generations.empty() ? r.metrics.cache_tokens : r.generations.front().gen_cache_tokens;
}

/// Change of the run's PPL against the full cache's, in %; NaN for the full cache itself or
/// where either has no evaluation.
inline double ppl_change_pct(const Run& r, const Run* base) {
  if (!base || base == &r || r.metrics.scored == 0) return std::numeric_limits<double>::quiet_NaN();
  return 100.0 * (r.metrics.ppl() / base->metrics.ppl() - 1.0);
}

inline Timings timings_of(const Run& r) {
  Timings t;
  std::vector<double> ttft, tpot, tok, first, second, comp, share;
  for (const auto& g : r.generations) {
    ttft.push_back(g.gen_ttft_s);
    if (g.gen_later_steps > 0) {
      tpot.push_back(g.gen_tpot_s());
      tok.push_back(g.gen_tok_s());
      first.push_back(g.gen_tpot_half_s(false));
      second.push_back(g.gen_tpot_half_s(true));
      comp.push_back(g.gen_compress_s);
      share.push_back(g.gen_compress_share());
    }
  }
  t.ttft = Spread::of(ttft);
  t.tpot = Spread::of(tpot);
  t.tok_s = Spread::of(tok);
  t.first_half = Spread::of(first);
  t.second_half = Spread::of(second);
  t.compress_s = Spread::of(comp);
  t.compress_share = Spread::of(share);
  if (r.metrics.scored > 0 && !r.recompute) t.eval_step = Spread::of(r.metrics.sample_step_s);
  t.repeats = static_cast<int64_t>(r.generations.size());
  return t;
}

inline std::string duration_text(double s) {
  char buf[32];
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s) / 3600, static_cast<int>(s) / 60 % 60);
  return buf;
}

/// Progress on standard error: on a terminal one line redrawn in place, in a log a line every
/// quarter of a run's evaluation and one per generation repeat. Shows the running PPL and an
/// ETA from the work done so far (evaluation steps and generated tokens).
class Progress {
 public:
  Progress(bool enabled, double total_work)
      : enabled_(enabled), tty_(isatty(2) != 0), total_(std::max(total_work, 1.0)),
        start_(std::chrono::steady_clock::now()) {}
  void start_run(const std::string& label, size_t run, size_t runs) {
    label_ = label;
    run_ = run;
    runs_ = runs;
    last_quarter_ = -1;
  }
  /// `work` units finished since the last call.
  void add_work(double work) { done_ += work; }
  void eval(size_t sample, size_t samples, int64_t done, int64_t total, double running_ppl) {
    if (!enabled_) return;
    const int64_t quarter = done * 4 / std::max<int64_t>(total, 1);
    if (!tty_ && done != total && quarter == last_quarter_) return;
    if (tty_ && done % 16 != 0 && done != total) return;
    last_quarter_ = quarter;
    char what[160];
    std::snprintf(what, sizeof what, "eval sample %zu/%zu %lld/%lld tokens, PPL %.3f", sample, samples,
                  (long long)done, (long long)total, running_ppl);
    show(what, done == total);
  }
  void generation(int64_t repeat, int64_t repeats, int64_t tokens) {
    if (!enabled_) return;
    char what[160];
    std::snprintf(what, sizeof what, "generation %lld/%lld (%lld new tokens)", (long long)repeat, (long long)repeats,
                  (long long)tokens);
    show(what, !tty_);
  }
  double elapsed_s() const { return rt::detail::seconds_since(start_); }

 private:
  void show(const char* what, bool end_line) {
    const double elapsed = elapsed_s();
    const double eta = done_ > 0 ? elapsed * (total_ - done_) / done_ : std::numeric_limits<double>::quiet_NaN();
    std::fprintf(stderr, "%s[%zu/%zu] %-20s %s  elapsed %s, ETA %s%s", tty_ ? "\r\033[K" : "", run_, runs_,
                 label_.c_str(), what, duration_text(elapsed).c_str(), duration_text(eta).c_str(),
                 end_line || !tty_ ? "\n" : "");
    std::fflush(stderr);
  }
  bool enabled_, tty_;
  double total_, done_ = 0;
  std::chrono::steady_clock::time_point start_;
  std::string label_;
  size_t run_ = 0, runs_ = 0;
  int64_t last_quarter_ = -1;
};

// --- files ------------------------------------------------------------------------------------

using kvtools::check_output_path;
using kvtools::write_atomically;

/// The results folder: --out, or results/<run name> with a name from what runs and the time.
inline std::string results_dir(const Options& o) {
  if (!o.out_dir.empty()) return o.out_dir;
  std::string name = o.run_name;
  if (name.empty()) {
    name = o.compare_all ? "compare-all" : o.compare_attention ? "compare-attention" : "";
    if (name.empty()) {
      for (const auto& [label, spec] : o.methods) {
        const std::string n = label.empty() ? spec.substr(0, spec.find('(')) : label;
        name += (name.empty() ? "" : "+") + n;
        if (name.size() > 40) break;
      }
      if (name.empty()) name = "baseline";
    }
    char stamp[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
    name += std::string("-") + stamp;
  }
  for (char& c : name)  // a folder name, never a path
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' || c == '+')) c = '_';
  return "results/" + name;
}

/// Checked before the (slow) model load: the results folder is, or can become, a writable folder.
inline void check_results_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec)) fail("--out " + dir + " exists and is not a directory");
  fs::path existing = fs::absolute(dir, ec);
  while (!existing.empty() && !fs::exists(existing, ec) && existing != existing.root_path()) existing = existing.parent_path();
  if (!fs::is_directory(existing, ec) || access(existing.c_str(), W_OK) != 0)
    fail("cannot create the results folder " + dir + ": " + existing.string() + " is not a writable folder");
}

/// Made once every check has passed, right before the runs: a failed start leaves no folder.
inline void create_results_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail("cannot create the results folder " + dir + ": " + ec.message());
  if (access(dir.c_str(), W_OK) != 0) fail("cannot create the results folder " + dir + ": it is not writable");
}

inline Json number(double x) { return std::isfinite(x) ? Json(x) : Json(nullptr); }

// A timing field and its spread: "<key>": median, "<key>_min", "<key>_max".
inline void put(Json& j, const std::string& key, const Spread& s) {
  j[key] = number(s.median);
  j[key + "_min"] = number(s.min);
  j[key + "_max"] = number(s.max);
}

/// How the runs were evaluated: one at a time, or as the rows of one batch (OnePass).
struct EvalPass {
  bool one_pass = false;
  int64_t rows = 0;            ///< runs in the one pass
  int64_t workers = 1;         ///< host threads it ran on
  int64_t calls = 0;           ///< model calls per step (groups of rows)
  double seconds = 0;          ///< its wall time over every sample (warm-up excluded)
  std::vector<double> step_s;  ///< per sample, the mean time of one batched step (all rows)
  int64_t peak_memory_bytes = -1;
};

inline Json results_json(const Options& o, const rt::ContractModel& model, const std::vector<Sample>& samples,
                         const std::vector<Run>& runs, int64_t window, const EvalPass& pass) {
  int64_t tokens = 0;
  for (const auto& s : samples) tokens += static_cast<int64_t>(s.tokens.size());
  const bool cuda = model.device().is_cuda();
  Json j;
  j["schema"] = 2;
  j["kvbench_version"] = kvc::version_string;
  j["model"] = model.info().name;
  j["model_file"] = o.model;
  j["contract_version"] = model.info().contract_version;
  j["model_context"] = model.info().max_positions;
  j["device"] = model.device().str();
  j["dtype"] = o.dtype;
  j["tokens"] = tokens;
  j["samples"] = samples.size();
  j["max_tokens"] = o.max_tokens;
  j["window"] = window;
  j["positions"] = o.positions;
  j["runtime"] = o.static_cache() ? "static" : "dynamic";
  j["schedule"] = o.static_cache() ? o.schedule : "every";
  j["slack"] = o.schedule == "chunked" ? o.slack : 0;
  j["prefill_chunk"] = o.prefill_chunk;
  j["compress_prefill"] = o.compress_prefill;
  j["shared_prompt"] = o.shared_prompt;
  j["cuda_graph"] = o.cuda_graph;
  j["native_step"] = o.native_step;
  // The native step's settings (runtime/native_step.hpp), "" without it: its products
  // ("default" = the fused gemv at one row), its launches ("default" = early where the card
  // allows) and its attention's slots per block ("default" = 64).
  const auto native_setting = [&o](const char* name) -> std::string {
    const char* value = std::getenv(name);
    return o.native_step ? (value ? value : "default") : "";
  };
  j["native_gemv"] = native_setting("KVC_NATIVE_GEMV");
  j["native_pdl"] = native_setting("KVC_NATIVE_PDL");
  j["native_chunk"] = native_setting("KVC_NATIVE_CHUNK");
  j["jit_optimize"] = torch::jit::getGraphExecutorOptimize();
  j["skip_layers"] = o.skip_layers;
  j["generate"] = o.generate;
  j["prompt_tokens"] = o.prompt_tokens;
  j["batch"] = o.batch;
  j["repeats"] = o.repeats;
  j["process_per_repeat"] = o.process_per_repeat == 1 && o.generate > 0;
  // Which pass gave which figure: quality from the evaluation (separate passes, or one batched
  // pass whose step serves every row), timings from each method's own generation measurement.
  Json ev;
  ev["mode"] = !o.eval ? "none" : pass.one_pass ? "one_pass" : "separate";
  if (pass.one_pass) {
    ev["rows"] = pass.rows;
    ev["workers"] = pass.workers;
    ev["calls_per_step"] = pass.calls;
    ev["runtime"] = "static";
    ev["seconds"] = number(pass.seconds);
    put(ev, "step_s", Spread::of(pass.step_s));
    ev["peak_memory_bytes"] = pass.peak_memory_bytes;
  }
  j["evaluation"] = ev;
  // Which clock gave each timing: the host's steady clock around synchronised work, or the
  // device's (CUDA events) for the compression share.
  j["clock"] = {{"ttft_s", "host"}, {"tpot_s", "host"}, {"throughput_tok_s", "host"}, {"eval_step_s", "host"},
                {"compress_s", cuda ? "device" : "host"}};
  j["timing"] = {
      {"ttft_s", "generation: prompt prefill, its compression and the first new token; median over repeats"},
      {"tpot_s", "generation: each new token after the first (decode step and compression); median over repeats"},
      {"throughput_tok_s", "generation: batch rows / TPOT; median over repeats"},
      {"eval_step_s", pass.one_pass
                          ? "evaluation ran as one batched pass: null per method; evaluation.step_s is the batch's "
                            "mean step (feed every row, score, compress each row), min/max over samples"
                          : "evaluation: mean step (feed, score, compress) of one pass per sample; min/max over samples"},
      {"peak_memory_bytes", std::string(cuda ? "the CUDA allocator's peak during the run; held_before_bytes: what "
                                               "earlier runs still held when it started (included in the peak)"
                                             : o.process_per_repeat == 1 && o.generate > 0
                                                   ? "the peak resident set during the run: the largest of this "
                                                     "process's (evaluation) and of each generation round's process"
                                                   : "the process's peak resident set during the run") +
                                (pass.one_pass ? "; with one-pass evaluation the generation measurement's only "
                                                 "(evaluation.peak_memory_bytes is the batch's)"
                                               : "")},
      {"warmup", std::string("untimed: one evaluation of 8 tokens and one generation before the first run; every "
                             "generation repeat runs on a fresh decoder, warmed up twice first (prefill, its "
                             "compression, decode up to a compression)") +
                     (o.process_per_repeat == 1 ? "; each repeat (a round over every run) in a fresh kvbench process, "
                                                  "which runs those warm-ups itself (this one only the evaluation's)"
                                                : "")}};
  Json inputs = Json::array();
  for (const auto& s : samples) inputs.push_back(s.source);
  j["inputs"] = inputs;
  Json results = Json::array();
  for (const auto& r : runs) {
    const auto& m = r.metrics;
    const Timings t = timings_of(r);
    const bool eval = m.scored > 0;
    Json x;
    x["label"] = r.label;
    x["spec"] = r.compressor ? Json(r.compressor->spec()) : Json(nullptr);
    x["ppl"] = eval ? number(m.ppl()) : Json(nullptr);
    x["accuracy"] = eval ? number(m.accuracy()) : Json(nullptr);
    x["scored_tokens"] = m.scored;
    put(x, "eval_step_s", t.eval_step);
    put(x, "ttft_s", t.ttft);
    put(x, "tpot_s", t.tpot);
    put(x, "throughput_tok_s", t.tok_s);
    x["cache_tokens"] = kept_tokens(r);
    x["cache_bytes"] = m.cache_bytes;
    x["max_layer_tokens"] = m.max_layer_tokens;
    x["peak_memory_bytes"] = m.peak_memory_bytes;
    x["held_before_bytes"] = r.held_before_bytes;
    x["reference"] = r.recompute ? Json("sliding window with re-computation") : Json(nullptr);
    x["warnings"] = m.warnings;
    if (!r.generations.empty()) {
      const auto& g = r.generations.front();
      Json gen;
      gen["batch"] = g.gen_batch;
      gen["prompt_tokens"] = o.prompt_tokens;
      gen["new_tokens"] = g.gen_tokens;
      gen["repeats"] = t.repeats;
      put(gen, "tpot_first_half_s", t.first_half);
      put(gen, "tpot_second_half_s", t.second_half);
      put(gen, "compress_s", t.compress_s);
      gen["compress_share"] = number(t.compress_share.median);
      gen["cache_tokens"] = g.gen_cache_tokens;
      x["generation"] = gen;
    }
    if (!m.windows.empty()) {
      Json ws = Json::array();
      for (const auto& w : m.windows)
        ws.push_back({{"sample", w.sample}, {"start", w.start}, {"end", w.end}, {"scored", w.scored},
                      {"ppl", number(w.ppl())}, {"accuracy", number(w.accuracy())}, {"cache_tokens", w.cache_tokens},
                      {"peak_memory_bytes", w.peak_memory_bytes}, {"step_s", number(w.step_s())}});
      x["windows"] = ws;
    }
    results.push_back(x);
  }
  j["results"] = results;
  return j;
}

// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
inline std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

/// The JSON's per-run figures as CSV, one row per result, the same keys as columns; a figure
/// the JSON has as null is an empty field.
inline std::string results_csv(const Json& j) {
  const std::vector<std::string> keys = {
      "label", "spec", "ppl", "accuracy", "eval_step_s", "eval_step_s_min", "eval_step_s_max", "ttft_s", "ttft_s_min",
      "ttft_s_max", "tpot_s", "tpot_s_min", "tpot_s_max", "throughput_tok_s", "throughput_tok_s_min",
      "throughput_tok_s_max", "cache_tokens", "cache_bytes", "max_layer_tokens", "peak_memory_bytes"};
  std::ostringstream out;
  for (size_t i = 0; i < keys.size(); ++i) out << (i ? "," : "") << keys[i];
  out << ",compress_share\n";
  for (const auto& r : j["results"]) {
    for (size_t i = 0; i < keys.size(); ++i) {
      const Json& v = r[keys[i]];
      out << (i ? "," : "") << (v.is_null() ? std::string() : v.is_string() ? csv_field(v.get<std::string>()) : v.dump());
    }
    const Json* share = r.contains("generation") ? &r["generation"]["compress_share"] : nullptr;
    out << ',' << (share && !share->is_null() ? share->dump() : std::string()) << "\n";
  }
  return out.str();
}

// --- screen -----------------------------------------------------------------------------------

inline std::string fixed(double x, int decimals) {
  if (!std::isfinite(x)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, x);
  return buf;
}

/// "12.34 (12.1-13.0)": median and range, in milliseconds.
inline std::string ms_spread(const Spread& s) {
  if (!s.measured()) return "-";
  const double ms = s.median * 1e3, max_ms = s.max * 1e3;
  const int d = ms < 10 ? 3 : ms < 100 ? 2 : 1;
  const int r = max_ms < 10 ? 2 : max_ms < 100 ? 1 : 0;
  // The range rounded outwards, so that it always contains the median as shown (112.6 ms with
  // a minimum of 112.6 reads "112.6 (112-116)", not "(113-116)").
  const double scale = std::pow(10.0, r);
  return fixed(s.median * 1e3, d) + " (" + fixed(std::floor(s.min * 1e3 * scale) / scale, r) + "-" +
         fixed(std::ceil(s.max * 1e3 * scale) / scale, r) + ")";
}

inline const Run* baseline_of(const std::vector<Run>& runs) {
  for (const auto& r : runs)
    if (!r.compressor && !r.recompute && r.metrics.scored > 0) return &r;
  return nullptr;
}

/// The line a run prints when it finishes (flushed, so a redirected log shows it at once); with
/// `timings_pending`, the line of its evaluation, its timed rounds still to come.
inline void print_run_line(const Run& r, size_t index, size_t count, const Run* baseline, bool timings_pending) {
  const auto& m = r.metrics;
  const Timings t = timings_of(r);
  std::string quality = "no evaluation";
  if (m.scored > 0) {
    quality = "PPL " + fixed(m.ppl(), 3);
    const double change = ppl_change_pct(r, baseline);
    if (std::isfinite(change)) quality += " (" + std::string(change >= 0 ? "+" : "") + fixed(change, 2) + "%)";
    quality += "  acc " + fixed(m.accuracy(), 4);
  }
  std::printf("[%zu/%zu] %-20s %s  cache %lld", index, count, r.label.c_str(), quality.c_str(), (long long)kept_tokens(r));
  if (t.tpot.measured() && !timings_pending) std::printf("  TPOT %s ms", ms_spread(t.tpot).c_str());  // TTFT: the speed table
  // A row of a one-pass evaluation has no time of its own until its generation has run.
  const std::string took = r.seconds > 0 ? duration_text(r.seconds) : "";
  const std::string pending = timings_pending ? "timed later" : "";
  if (!took.empty() || !pending.empty())
    std::printf("  (%s%s%s)", took.c_str(), !took.empty() && !pending.empty() ? "; " : "", pending.c_str());
  std::printf("\n");
  std::fflush(stdout);
}

/// Quality: PPL and accuracy with their change against the full cache, cache and memory.
inline void print_quality_table(const std::vector<Run>& runs) {
  const Run* base = baseline_of(runs);
  std::printf("\n%-22s %9s %8s %8s %8s %7s %9s %9s\n", "quality", "PPL", "dPPL %", "acc", "dacc pp", "cache",
              "cache MiB", "peak MiB");
  for (const auto& r : runs) {
    const auto& m = r.metrics;
    const bool eval = m.scored > 0;
    const double dppl = ppl_change_pct(r, base);
    const double dacc = std::isfinite(dppl) ? 100.0 * (m.accuracy() - base->metrics.accuracy()) : NAN;
    std::printf("%-22s %9s %8s %8s %8s %7lld %9s %9s\n", r.label.c_str(), eval ? fixed(m.ppl(), 3).c_str() : "-",
                fixed(dppl, 2).c_str(), eval ? fixed(m.accuracy(), 4).c_str() : "-", fixed(dacc, 2).c_str(),
                (long long)kept_tokens(r), r.recompute || !eval ? "-" : fixed(m.cache_bytes / kMiB, 2).c_str(),
                m.peak_memory_bytes < 0 ? "-" : fixed(m.peak_memory_bytes / kMiB, 1).c_str());
  }
}

/// Speed: the generation measurement, median (min-max) over the repeats.
inline void print_speed_table(const Options& o, const std::vector<Run>& runs) {
  std::printf("\n%-22s %22s %21s %8s %6s %7s\n", "speed", "TTFT ms (min-max)", "TPOT ms (min-max)", "tok/s", "comp%",
              "2nd/1st");
  for (const auto& r : runs) {
    if (r.recompute) continue;
    const Timings t = timings_of(r);
    std::printf("%-22s %22s %21s %8s %6s %7s\n", r.label.c_str(), ms_spread(t.ttft).c_str(), ms_spread(t.tpot).c_str(),
                fixed(t.tok_s.median, 1).c_str(), fixed(100.0 * t.compress_share.median, 2).c_str(),
                fixed(t.second_over_first(), 3).c_str());
  }
  std::printf("(generation: %lld-token prompt, %lld new tokens, batch %lld; median of %lld repeats%s;\n"
              " TTFT = prompt prefill through the first new token)\n",
              (long long)o.prompt_tokens, (long long)o.generate, (long long)o.batch, (long long)o.repeats,
              o.process_per_repeat == 1 ? ", each in a fresh process" : "");
}

/// Every column in one table (--wide).
inline void print_wide_table(const std::vector<Run>& runs) {
  const Run* base = baseline_of(runs);
  std::printf("\n%-22s %9s %8s %8s %10s %22s %21s %8s %7s %9s %9s %6s %7s\n", "method", "PPL", "dPPL %", "acc",
              "eval ms", "TTFT ms (min-max)", "TPOT ms (min-max)", "tok/s", "cache", "cache MiB", "peak MiB", "comp%",
              "2nd/1st");
  for (const auto& r : runs) {
    const auto& m = r.metrics;
    const Timings t = timings_of(r);
    const bool eval = m.scored > 0;
    std::printf("%-22s %9s %8s %8s %10s %22s %21s %8s %7lld %9s %9s %6s %7s\n", r.label.c_str(),
                eval ? fixed(m.ppl(), 3).c_str() : "-", fixed(ppl_change_pct(r, base), 2).c_str(),
                eval ? fixed(m.accuracy(), 4).c_str() : "-", fixed(t.eval_step.median * 1e3, 3).c_str(),
                ms_spread(t.ttft).c_str(), ms_spread(t.tpot).c_str(), fixed(t.tok_s.median, 1).c_str(),
                (long long)kept_tokens(r), r.recompute || !eval ? "-" : fixed(m.cache_bytes / kMiB, 2).c_str(),
                m.peak_memory_bytes < 0 ? "-" : fixed(m.peak_memory_bytes / kMiB, 1).c_str(),
                fixed(100.0 * t.compress_share.median, 2).c_str(), fixed(t.second_over_first(), 3).c_str());
  }
}

inline void print_tables(const Options& o, const std::vector<Run>& runs, const EvalPass& pass) {
  if (o.wide) {
    print_wide_table(runs);
  } else {
    if (o.eval) print_quality_table(runs);
    if (o.generate > 0 && !o.throughput) print_speed_table(o, runs);
  }
  if (pass.one_pass)
    std::printf("(quality from one pass of %lld rows: %s, %.2f ms per batched step; %s)\n", (long long)pass.rows,
                duration_text(pass.seconds).c_str(), 1e3 * Spread::of(pass.step_s).median,
                o.generate > 0 && !o.throughput ? "peak memory and timings from each method's own generation"
                               : "no per-method timings or peak memory: --generate N measures them");
  for (const auto& r : runs)
    for (const auto& w : r.metrics.warnings) std::printf("warning: %s: %s\n", r.label.c_str(), w.c_str());
}

/// Per-window PPL of every run side by side (long texts).
inline void print_windows(const std::vector<Run>& runs) {
  if (runs.empty() || runs.front().metrics.windows.empty()) return;
  std::printf("\nPPL per window (tokens start-end of sample 1; cache tokens at the end)\n%-13s", "window");
  for (const auto& r : runs) std::printf(" %22s", r.label.c_str());
  std::printf("\n");
  const auto& first = runs.front().metrics.windows;
  for (size_t w = 0; w < first.size() && first[w].sample == 0; ++w) {
    std::printf("%6lld-%-6lld", (long long)first[w].start, (long long)first[w].end);
    for (const auto& r : runs) {
      const auto& x = r.metrics.windows;
      if (w < x.size()) std::printf(" %13.3f (%6lld)", x[w].ppl(), (long long)x[w].cache_tokens);
      else std::printf(" %22s", "-");
    }
    std::printf("\n");
  }
}

// --- trace ------------------------------------------------------------------------------------

/// `--trace FILE`: one JSON line per (compression, layer) of the evaluation: what the layer
/// kept, as original positions (in slot order), one list when every head kept the same tokens,
/// else one per head. Layers the method never compresses are left out.
class Trace {
 public:
  explicit Trace(const std::string& path) : path_(path) {
    if (path.empty()) return;
    check_output_path("--trace", path);
    out_.open(path, std::ios::binary | std::ios::trunc);
    if (!out_) fail("cannot write --trace file " + path + ": " + std::strerror(errno));
  }
  bool enabled() const { return out_.is_open(); }
  void record(const std::string& label, int64_t sample, int64_t step, const rt::Decoder& d) {
    const kvc::Compressor* c = d.options().compressor;
    const std::vector<int64_t> skip = c ? c->skip_layers() : std::vector<int64_t>{};
    const int64_t layers = d.model().info().num_layers;
    for (int64_t l = 0; l < layers; ++l) {
      if (std::find(skip.begin(), skip.end(), l) != skip.end()) continue;
      const at::Tensor pos = d.original_positions(l).select(0, 0).to(at::kCPU).contiguous();  // [heads, len]
      Json line = {{"label", label}, {"sample", sample}, {"step", step}, {"layer", l}};
      const bool same = pos.size(0) == 1 || at::equal(pos, pos.narrow(0, 0, 1).expand_as(pos));
      const int64_t* p = pos.data_ptr<int64_t>();
      const int64_t len = pos.size(1);
      if (same) {
        line["positions"] = std::vector<int64_t>(p, p + len);
      } else {
        Json heads = Json::array();
        for (int64_t h = 0; h < pos.size(0); ++h) heads.push_back(std::vector<int64_t>(p + h * len, p + (h + 1) * len));
        line["heads"] = heads;
      }
      out_ << line.dump() << '\n';
    }
    if (!out_) fail("cannot write --trace file " + path_ + ": " + std::strerror(errno));
  }
  void close() {
    if (!enabled()) return;
    out_.close();
    if (!out_) fail("cannot write --trace file " + path_ + ": " + std::strerror(errno));
  }

 private:
  std::string path_;
  std::ofstream out_;
};

// --- plots ------------------------------------------------------------------------------------

/// A Python that can draw (matplotlib and numpy importable), or "" when there is none.
inline std::string plotting_python() {
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    const std::string probe = std::string(py) + " -c 'import matplotlib, numpy' >/dev/null 2>&1";
    if (std::system(probe.c_str()) == 0) return py;
  }
  return "";
}

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// Draws the figures of `json` (and of the trace, when given) into `dir` with the repository's
/// plot scripts; without matplotlib, prints the exact commands instead. Also writes them to
/// dir/plot.sh, so the figures can be redrawn later.
inline void draw_plots(const std::string& dir, const std::string& json, const std::string& trace) {
  const std::string scripts = KVC_PYTHON_DIR;
  std::vector<std::string> commands = {"python3 " + shell_quote(scripts + "/plot_results.py") + " " + shell_quote(json) +
                                       " --out-dir " + shell_quote(dir)};
  if (!trace.empty())
    commands.push_back("python3 " + shell_quote(scripts + "/plot_trace.py") + " " + shell_quote(trace) + " --out-dir " +
                       shell_quote(dir));
  std::string script = "#!/bin/sh\n# Redraws this run's figures (kvbench wrote this file).\nset -e\n";
  for (const auto& c : commands) script += c + "\n";
  write_atomically("plot", dir + "/plot.sh", script);
  const std::string py = plotting_python();
  if (py.empty()) {
    std::printf("plots: no Python with matplotlib here (Debian: apt-get install python3-matplotlib); draw them with:\n");
    for (const auto& c : commands) std::printf("  %s\n", c.c_str());
    return;
  }
  for (std::string c : commands) {
    c.replace(0, std::string("python3").size(), py);
    c += " >/dev/null";
    if (std::system(c.c_str()) != 0)
      std::printf("plots: the plot script failed (its errors are above); command: %s\n", c.c_str());
  }
}

}  // namespace kvbench
