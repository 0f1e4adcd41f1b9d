#pragma once
// --throughput: decode throughput over contexts x batches for every run, and the largest batch
// that fits in memory. What a serving engineer asks of compression at scale: how many long
// sequences fit at once, and how fast they decode. One point = one generate() per repeat on a
// fresh decoder; a batch that does not fit ends with the allocator's out-of-memory error (or,
// under --memory-limit, a peak above it), recorded as such.
#include "largest_batch.hpp"
#include "report.hpp"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace kvbench {

/// One (run, context, batch) measurement.
struct ThroughputPoint {
  size_t run = 0;
  int64_t context = 0, batch = 0;
  bool fits = false;
  std::string why;  ///< why it does not fit: the allocator's message, or the peak over the limit
  Spread ttft, tpot, tok_s;
  int64_t peak_bytes = -1, cache_tokens = 0;
};

/// An allocation that failed for want of memory: LibTorch's OutOfMemoryError (CUDA), or an
/// allocator's message saying so (the CPU allocator's in LibTorch 1.13).
inline bool is_out_of_memory(const std::exception& e) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e)) return true;
  const std::string what = e.what();
  return what.find("out of memory") != std::string::npos || what.find("not enough memory") != std::string::npos;
}

/// On the CPU a limit is checked against the peak resident set after each point: one above
/// the machine's memory would let the system's out-of-memory killer end kvbench first.
inline void check_host_memory_limit(int64_t limit) {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  while (meminfo >> key >> kb) {
    if (key == "MemTotal:") {
      if (limit > kb * 1024)
        fail("--memory-limit " + fixed(limit / kMiB, 0) + " MiB is more than this machine's " + fixed(kb / 1024.0, 0) +
             " MiB of memory");
      return;
    }
    std::getline(meminfo, key);
  }
}

// --- report ---------------------------------------------------------------------------------

inline void print_throughput(const std::vector<Run>& runs, const std::vector<ThroughputPoint>& points,
                             const std::vector<std::pair<size_t, int64_t>>& largest_keys,
                             const std::vector<int64_t>& largest) {
  std::printf("\nthroughput: decode tokens/s = batch / TPOT (median over repeats); peak memory of the run\n");
  std::printf("%-20s %8s %6s %12s %12s %10s %10s  %s\n", "method", "context", "batch", "TTFT ms", "TPOT ms", "tok/s",
              "peak MiB", "fits");
  std::vector<ThroughputPoint> sorted = points;
  std::stable_sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
    return std::tie(a.run, a.context, a.batch) < std::tie(b.run, b.context, b.batch);
  });
  for (const auto& p : sorted) {
    std::printf("%-20s %8lld %6lld %12s %12s %10s %10s  %s\n", runs[p.run].label.c_str(), (long long)p.context,
                (long long)p.batch, p.fits ? fixed(p.ttft.median * 1e3, 2).c_str() : "-",
                p.fits ? fixed(p.tpot.median * 1e3, 3).c_str() : "-", p.fits ? fixed(p.tok_s.median, 0).c_str() : "-",
                p.peak_bytes < 0 ? "-" : fixed(p.peak_bytes / kMiB, 0).c_str(),
                p.fits ? "yes" : ("no: " + p.why).c_str());
  }
  if (largest_keys.empty()) return;
  std::printf("\nlargest batch that fits (and the next one does not)\n");
  std::printf("%-20s %8s %8s %10s\n", "method", "context", "batch", "tok/s");
  for (size_t i = 0; i < largest_keys.size(); ++i) {
    const auto [run, context] = largest_keys[i];
    double tok_s = std::numeric_limits<double>::quiet_NaN();
    for (const auto& p : points)
      if (p.run == run && p.context == context && p.batch == largest[i] && p.fits) tok_s = p.tok_s.median;
    std::printf("%-20s %8lld %8s %10s\n", runs[run].label.c_str(), (long long)context,
                largest[i] == 0 ? "none" : std::to_string(largest[i]).c_str(), fixed(tok_s, 0).c_str());
  }
}

inline Json throughput_json(const std::vector<Run>& runs, const std::vector<ThroughputPoint>& points,
                            const std::vector<int64_t>& contexts, int64_t new_tokens, int64_t memory_limit,
                            const std::vector<std::pair<size_t, int64_t>>& largest_keys,
                            const std::vector<int64_t>& largest) {
  Json j;
  j["contexts"] = contexts;
  j["new_tokens"] = new_tokens;
  j["memory_limit_bytes"] = memory_limit;
  j["points"] = Json::array();
  for (const auto& p : points) {
    Json x = {{"label", runs[p.run].label}, {"context", p.context}, {"batch", p.batch}, {"fits", p.fits},
              {"peak_memory_bytes", p.peak_bytes}};
    if (p.fits) {
      put(x, "ttft_s", p.ttft);
      put(x, "tpot_s", p.tpot);
      put(x, "throughput_tok_s", p.tok_s);
      x["cache_tokens"] = p.cache_tokens;
    } else {
      x["why"] = p.why;
    }
    j["points"].push_back(x);
  }
  // next_fails: the batch after it was measured and did not fit (false only at the search's cap).
  j["largest_batch"] = Json::array();
  for (size_t i = 0; i < largest_keys.size(); ++i) {
    const auto [run, context] = largest_keys[i];
    bool next_fails = false;
    for (const auto& p : points)
      next_fails |= p.run == run && p.context == context && p.batch == largest[i] + 1 && !p.fits;
    j["largest_batch"].push_back({{"label", runs[run].label}, {"context", context}, {"batch", largest[i]},
                                  {"next_fails", next_fails}});
  }
  return j;
}

}  // namespace kvbench
