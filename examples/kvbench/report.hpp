#pragma once
// kvbench's output: progress on stderr, the table and warnings on stdout, JSON and CSV files.
#include "cli.hpp"
#include "inputs.hpp"

#include <kvcompress/runtime/evaluate.hpp>
#include <kvcompress/runtime/model.hpp>

#include <torch/script.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include <unistd.h>

namespace kvbench {

class ProgressBar {
 public:
  // On a terminal the bar redraws in place; in a log, one line per finished sample.
  explicit ProgressBar(bool enabled) : enabled_(enabled), tty_(isatty(2) != 0) {}
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

// An output file: checked before the run (so a typo does not cost the run), then written whole
// to a temporary file beside it and renamed over it, every write checked: a failed write is an
// error and leaves no partial file.
inline void check_output_path(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p(path);
  if (path.empty()) fail(flag + " needs a file name");
  if (fs::exists(p, ec) && !fs::is_regular_file(p, ec))
    fail(flag + " " + path + " exists and is not a regular file");
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec)) fail(flag + " " + path + ": no such directory " + dir.string());
  if (access(dir.c_str(), W_OK) != 0) fail(flag + " " + path + ": directory " + dir.string() + " is not writable");
}

inline void write_atomically(const std::string& flag, const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp" + std::to_string(getpid());
  auto failed = [&](const std::string& why) {
    std::remove(tmp.c_str());
    fail("cannot write " + flag + " file " + path + ": " + why);
  };
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) failed(std::strerror(errno));
  const bool written = std::fwrite(content.data(), 1, content.size(), f) == content.size() && std::fflush(f) == 0 &&
                       fsync(fileno(f)) == 0;
  const int error = errno;
  if (std::fclose(f) != 0 || !written) failed(std::strerror(written ? errno : error));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) failed(std::strerror(errno));
}

inline std::string json_escape(const std::string& s) {
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

inline std::string num(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

inline std::string quoted(const std::string& s) { return "\"" + json_escape(s) + "\""; }

// Evaluation metrics are null when the evaluation did not run (--no-eval).
inline std::string eval_num(const rt::RunMetrics& m, double x) { return m.scored > 0 ? num(x) : "null"; }

inline void write_json(const std::string& path, const Options& o, const rt::ContractModel& model,
                       const std::vector<Sample>& samples, const std::vector<Run>& runs, int64_t window) {
  std::ostringstream out;
  int64_t tokens = 0;
  for (const auto& s : samples) tokens += static_cast<int64_t>(s.tokens.size());
  out << "{\n  \"model\": " << quoted(model.info().name) << ",\n"
      << "  \"model_file\": " << quoted(o.model) << ",\n"
      << "  \"contract_version\": " << model.info().contract_version << ",\n"
      << "  \"model_context\": " << model.info().max_positions << ",\n"
      << "  \"device\": " << quoted(model.device().str()) << ",\n"
      << "  \"dtype\": \"" << o.dtype << "\",\n"
      << "  \"tokens\": " << tokens << ",\n"
      << "  \"samples\": " << samples.size() << ",\n"
      << "  \"max_tokens\": " << o.max_tokens << ",\n"
      << "  \"window\": " << window << ",\n"
      << "  \"positions\": \"" << o.positions << "\",\n"
      << "  \"runtime\": \"" << (o.static_cache() ? "static" : "dynamic") << "\",\n"
      << "  \"schedule\": \"" << (o.static_cache() ? o.schedule : "every") << "\",\n"
      << "  \"slack\": " << (o.schedule == "chunked" ? o.slack : 0) << ",\n"
      << "  \"prefill_chunk\": " << o.prefill_chunk << ",\n"
      << "  \"cuda_graph\": " << (o.cuda_graph ? "true" : "false") << ",\n"
      << "  \"jit_optimize\": " << (torch::jit::getGraphExecutorOptimize() ? "true" : "false") << ",\n"
      << "  \"skip_layers\": " << kvc::params::format_int_list(o.skip_layers) << ",\n"
      << "  \"inputs\": [";
  for (size_t i = 0; i < samples.size(); ++i) out << (i ? ", " : "") << quoted(samples[i].source);
  out << "],\n  \"results\": [\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    const auto& m = r.metrics;
    out << "    {\"label\": " << quoted(r.label) << ", \"spec\": "
        << (r.compressor ? quoted(r.compressor->spec()) : std::string("null"))
        << ", \"ppl\": " << eval_num(m, m.ppl()) << ", \"accuracy\": " << eval_num(m, m.accuracy())
        << ", \"ttft_s\": " << (r.recompute ? "null" : eval_num(m, m.ttft_s()))
        << ", \"tpot_s\": " << (r.recompute ? "null" : eval_num(m, m.tpot_s()))
        << ", \"throughput_tok_s\": " << eval_num(m, m.throughput_tok_s())
        << ", \"cache_tokens\": " << m.cache_tokens << ", \"cache_bytes\": " << m.cache_bytes
        << ", \"max_layer_tokens\": " << m.max_layer_tokens
        << ", \"peak_memory_bytes\": " << m.peak_memory_bytes << ", \"scored_tokens\": " << m.scored
        << ", \"reference\": " << (r.recompute ? "\"sliding window with re-computation\"" : "null");
    out << ", \"warnings\": [";
    for (size_t w = 0; w < m.warnings.size(); ++w) out << (w ? ", " : "") << quoted(m.warnings[w]);
    out << "]";
    if (o.generate > 0 && !r.recompute)
      out << ", \"generation\": {\"batch\": " << m.gen_batch << ", \"prompt_tokens\": " << o.prompt_tokens
          << ", \"new_tokens\": " << m.gen_tokens << ", \"tok_s\": " << num(m.gen_tok_s())
          << ", \"ttft_s\": " << num(m.gen_ttft_s) << ", \"tpot_s\": " << num(m.gen_tpot_s())
          << ", \"tpot_first_half_s\": " << num(m.gen_tpot_half_s(false))
          << ", \"tpot_second_half_s\": " << num(m.gen_tpot_half_s(true))
          << ", \"compress_s\": " << num(m.gen_compress_s) << ", \"compress_share\": " << num(m.gen_compress_share())
          << ", \"cache_tokens\": " << m.gen_cache_tokens << "}";
    if (!m.windows.empty()) {
      out << ",\n     \"windows\": [";
      for (size_t w = 0; w < m.windows.size(); ++w) {
        const auto& x = m.windows[w];
        out << (w ? ",\n       " : "\n       ") << "{\"sample\": " << x.sample << ", \"start\": " << x.start
            << ", \"end\": " << x.end << ", \"scored\": " << x.scored << ", \"ppl\": " << num(x.ppl()) << ", \"accuracy\": " << num(x.accuracy())
            << ", \"cache_tokens\": " << x.cache_tokens << ", \"peak_memory_bytes\": " << x.peak_memory_bytes
            << ", \"step_s\": " << num(x.step_s()) << "}";
      }
      out << "]";
    }
    out << "}" << (i + 1 < runs.size() ? "," : "") << "\n";
  }
  out << "  ]\n}\n";
  write_atomically("--json", path, out.str());
}

// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
inline std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

// The JSON's figures, one row per result; a figure the JSON has as null is an empty field.
inline void write_csv(const std::string& path, const Options& o, const std::vector<Run>& runs) {
  std::ostringstream out;
  out << "label,spec,ppl,accuracy,ttft_s,tpot_s,throughput_tok_s,cache_tokens,cache_bytes,peak_memory_bytes";
  if (o.generate > 0) out << ",gen_ttft_s,gen_tpot_s,gen_compress_share";
  out << "\n";
  auto field = [](const std::string& json_number) { return json_number == "null" ? std::string() : json_number; };
  for (const auto& r : runs) {
    const auto& m = r.metrics;
    out << csv_field(r.label) << ',' << csv_field(r.compressor ? r.compressor->spec() : "") << ','
        << field(eval_num(m, m.ppl())) << ',' << field(eval_num(m, m.accuracy())) << ','
        << field(r.recompute ? "null" : eval_num(m, m.ttft_s())) << ','
        << field(r.recompute ? "null" : eval_num(m, m.tpot_s())) << ',' << field(eval_num(m, m.throughput_tok_s()))
        << ',' << m.cache_tokens << ',' << m.cache_bytes << ',' << m.peak_memory_bytes;
    if (o.generate > 0) {
      if (r.recompute) out << ",,,";
      else out << ',' << field(num(m.gen_ttft_s)) << ',' << field(num(m.gen_tpot_s())) << ',' << field(num(m.gen_compress_share()));
    }
    out << "\n";
  }
  write_atomically("--csv", path, out.str());
}

inline void print_table(const Options& o, const std::vector<Run>& runs) {
  std::printf("%-22s %9s %8s %9s %9s %9s %7s %10s %10s", "method", "PPL", "acc", "TTFT ms", "TPOT ms",
              "tok/s", "cache", "cache MB", "peak MB");
  if (o.generate > 0) std::printf(" %11s %11s %9s %7s %8s", "gen TTFT ms", "gen TPOT ms", "gen tok/s", "comp %", "2nd/1st");
  std::printf("\n");
  for (const auto& r : runs) {
    const auto& m = r.metrics;
    if (r.recompute)  // one forward per window: no per-token times, no cache
      std::printf("%-22s %9.3f %8.4f %9s %9s %9.1f %7lld %10s", r.label.c_str(), m.ppl(), m.accuracy(), "-", "-",
                  m.throughput_tok_s(), (long long)m.cache_tokens, "-");
    else if (m.scored > 0)
      std::printf("%-22s %9.3f %8.4f %9.3f %9.3f %9.1f %7lld %10.2f", r.label.c_str(), m.ppl(), m.accuracy(),
                  m.ttft_s() * 1e3, m.tpot_s() * 1e3, m.throughput_tok_s(), (long long)m.cache_tokens,
                  m.cache_bytes / 1048576.0);
    else  // --no-eval: only the generation measurement ran
      std::printf("%-22s %9s %8s %9s %9s %9s %7lld %10s", r.label.c_str(), "-", "-", "-", "-", "-",
                  (long long)m.gen_cache_tokens, "-");
    std::printf(" %10.1f", m.peak_memory_bytes < 0 ? -1.0 : m.peak_memory_bytes / 1048576.0);
    if (o.generate > 0 && !r.recompute) {
      const double first = m.gen_tpot_half_s(false);
      std::printf(" %11.3f %11.3f %9.1f %7.2f %8.3f", m.gen_ttft_s * 1e3, m.gen_tpot_s() * 1e3, m.gen_tok_s(),
                  100.0 * m.gen_compress_share(), first > 0 ? m.gen_tpot_half_s(true) / first : 0.0);
    }
    std::printf("\n");
  }
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

}  // namespace kvbench
