#pragma once
// The course project's evaluation, exactly: feed token t, score token t + 1 from the logits
// (NLL and top-1 hit), then compress the cache; positions are absolute token indices. Plus a
// generation measurement: prefill a prompt, then greedy decoding with compression every step.
#include <kvcompress/compressor.hpp>
#include <kvcompress/positions.hpp>
#include <kvcompress/runtime/memory.hpp>
#include <kvcompress/runtime/model.hpp>
#include <kvcompress/runtime/static_decoder.hpp>
#include <kvcompress/runtime/timeline.hpp>

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <numeric>
#include <vector>

namespace kvcompress {
namespace runtime {

/// Totals over the samples of one run (one method); the metrics are derived from them.
struct RunMetrics {
  double nll_sum = 0;
  int64_t scored = 0, hits = 0, tokens = 0, samples = 0;
  double total_s = 0, first_steps_s = 0, later_steps_s = 0;
  int64_t later_steps = 0;
  int64_t cache_tokens = 0, cache_bytes = 0, peak_memory_bytes = -1;
  double gen_ttft_s = 0, gen_later_s = 0;
  int64_t gen_later_steps = 0, gen_tokens = 0, gen_cache_tokens = 0, gen_batch = 1;
  // Device clock (runtime/timeline.hpp) of the decode steps after the first: each step's time
  // including its compression, and the time spent compressing.
  std::vector<double> gen_step_s;
  double gen_compress_s = 0;

  double ppl() const { return std::exp(nll_sum / static_cast<double>(std::max<int64_t>(scored, 1))); }
  double accuracy() const { return static_cast<double>(hits) / static_cast<double>(std::max<int64_t>(scored, 1)); }
  double ttft_s() const { return first_steps_s / static_cast<double>(std::max<int64_t>(samples, 1)); }
  double tpot_s() const { return later_steps_s / static_cast<double>(std::max<int64_t>(later_steps, 1)); }
  double throughput_tok_s() const { return total_s > 0 ? static_cast<double>(tokens) / total_s : 0.0; }
  double gen_tpot_s() const { return gen_later_s / static_cast<double>(std::max<int64_t>(gen_later_steps, 1)); }
  /// Decode throughput of the generation measurement: batch rows per TPOT.
  double gen_tok_s() const { return gen_later_s > 0 ? static_cast<double>(gen_batch) / gen_tpot_s() : 0.0; }
  /// Share of the decode time spent compressing (device clock).
  double gen_compress_share() const {
    const double total = std::accumulate(gen_step_s.begin(), gen_step_s.end(), 0.0);
    return total > 0 ? gen_compress_s / total : 0.0;
  }
  /// Mean step time over the first (`second_half` false) or second half of the decode steps:
  /// equal halves mean TPOT is flat in the number of generated tokens.
  double gen_tpot_half_s(bool second_half) const {
    const size_t mid = gen_step_s.size() / 2;
    const auto b = gen_step_s.begin() + static_cast<std::ptrdiff_t>(second_half ? mid : 0);
    const auto e = second_half ? gen_step_s.end() : gen_step_s.begin() + static_cast<std::ptrdiff_t>(mid);
    return e > b ? std::accumulate(b, e, 0.0) / static_cast<double>(e - b) : 0.0;
  }
};

using Progress = std::function<void(int64_t done, int64_t total)>;

namespace detail {

/// Marks of a decode loop: after each model step and, when there is a compressor, after its
/// compression (which may do nothing on a chunked schedule).
struct DecodeMarks {
  explicit DecodeMarks(at::Device device) : timeline(device), start(timeline.mark()) {}
  void stepped() { step_ends.push_back(timeline.mark()); }
  void compressed() { compress_ends.push_back(timeline.mark()); }
  /// Per-step times and compression time into `m` (waits for the last mark).
  void record(RunMetrics& m) const {
    const std::vector<size_t>& ends = compress_ends.empty() ? step_ends : compress_ends;
    size_t previous = start;
    for (size_t i = 0; i < ends.size(); ++i) {
      m.gen_step_s.push_back(timeline.seconds(previous, ends[i]));
      if (!compress_ends.empty()) m.gen_compress_s += timeline.seconds(step_ends[i], compress_ends[i]);
      previous = ends[i];
    }
  }
  Timeline timeline;
  size_t start;
  std::vector<size_t> step_ends, compress_ends;
};

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Sequence length of the first layer the compressor may touch (the seed's "KV cache size").
inline int64_t first_compressed_layer_tokens(const KVCache& cache, const Compressor* compressor,
                                             const std::vector<int64_t>& baseline_skip) {
  const std::vector<int64_t> skip = compressor ? compressor->skip_layers() : baseline_skip;
  for (size_t i = 0; i < cache.size(); ++i)
    if (std::find(skip.begin(), skip.end(), static_cast<int64_t>(i)) == skip.end())
      return cache[i].first.size(2);
  return cache.empty() ? 0 : cache[0].first.size(2);
}

inline int64_t cache_bytes(const KVCache& cache) {
  int64_t bytes = 0;
  for (const auto& [k, v] : cache)
    bytes += static_cast<int64_t>(k.numel() * k.element_size() + v.numel() * v.element_size());
  return bytes;
}

/// The course project's loop, shared by both runtimes: for each token, `step(id, position)`
/// feeds it and returns logits [1, 1, vocab]; token t + 1 is scored; `compress()` runs; the
/// scores come to the host (the step's one synchronisation) and the step's time is booked.
/// `finish()` returns the final cache.
template <class Step, class Compress, class Finish>
KVCache token_loop(const Compressor* compressor, const std::vector<int64_t>& tokens,
                   RunMetrics& m, const std::vector<int64_t>& baseline_skip, const Progress& progress,
                   Step&& step, Compress&& compress, Finish&& finish) {
  c10::InferenceMode guard;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const auto run_start = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < n; ++t) {
    const auto step_start = std::chrono::steady_clock::now();
    const at::Tensor logits_all = step(tokens[t], t);
    at::Tensor scored;
    if (t + 1 < n) {
      const at::Tensor logits = logits_all.select(0, 0).select(0, -1);
      const at::Tensor nll = at::logsumexp(logits, 0) - logits[tokens[t + 1]];
      scored = at::stack({nll.to(at::kDouble), logits.argmax().to(at::kDouble)});
    } else {
      scored = logits_all.sum().to(at::kDouble);  // last step: synchronise all the same
    }
    if (compressor) compress();
    const at::Tensor host = scored.to(at::kCPU);
    if (t + 1 < n) {
      m.nll_sum += host[0].item<double>();
      m.hits += static_cast<int64_t>(host[1].item<double>()) == tokens[t + 1] ? 1 : 0;
      ++m.scored;
    }
    const double dt = seconds_since(step_start);
    if (t == 0) m.first_steps_s += dt;
    else { m.later_steps_s += dt; ++m.later_steps; }
    if (progress) progress(t + 1, n);
  }
  m.total_s += seconds_since(run_start);
  m.tokens += n;
  ++m.samples;
  KVCache cache = finish();
  m.cache_tokens = first_compressed_layer_tokens(cache, compressor, baseline_skip);
  m.cache_bytes = cache_bytes(cache);
  return cache;
}

/// The rotation positions of the `cache` rule: one [batch, heads, len] tensor per layer,
/// extended as tokens arrive and compacted by compress_reassigning_positions.
class RotationTracker {
 public:
  RotationTracker(const ContractModel& model, PositionRule rule, int64_t batch = 1) : rule_(rule) {
    if (rule != PositionRule::cache) return;
    for (int64_t l = 0; l < model.info().num_layers; ++l)
      rotation_.push_back(at::empty({batch, model.info().num_heads, 0},
                                    at::TensorOptions().dtype(at::kLong).device(model.device())));
    rotary_ndims_ = model.info().rotary_ndims;
    base_ = model.info().rotary_base;
  }
  /// Tokens at positions first .. first + t - 1 were appended to every layer.
  void appended(int64_t first, int64_t t) {
    for (auto& r : rotation_)
      r = at::cat({r, at::arange(first, first + t, r.options()).expand({r.size(0), r.size(1), t})}, 2);
  }
  KVCache compress(const Compressor& c, const KVCache& kv, int64_t next_position) {
    if (rule_ == PositionRule::original) return c.compress(kv);
    return compress_reassigning_positions(c, kv, rotation_, next_position, rotary_ndims_, base_);
  }

 private:
  PositionRule rule_;
  std::vector<at::Tensor> rotation_;
  int64_t rotary_ndims_ = 0;
  double base_ = 10000.0;
};

}  // namespace detail

/// Token-by-token evaluation of one sample with the concatenating cache (the course project's
/// runtime); adds to `m` and returns the final cache. `compressor` null = full cache.
/// Positions: tokens are fed at their absolute index; under PositionRule::cache, compressed
/// layers' kept keys are re-rotated so that distances count cache slots (StreamingLLM).
inline KVCache evaluate_sample(ContractModel& model, const Compressor* compressor,
                               const std::vector<int64_t>& tokens, RunMetrics& m,
                               const std::vector<int64_t>& baseline_skip = {0, 1},
                               const Progress& progress = nullptr,
                               PositionRule positions = PositionRule::original) {
  const auto ids_opts = at::TensorOptions().dtype(at::kLong).device(model.device());
  KVCache cache = model.empty_cache();
  detail::RotationTracker rotation(model, positions);
  int64_t next = 0;
  return detail::token_loop(
      compressor, tokens, m, baseline_skip, progress,
      [&](int64_t id, int64_t t) {
        auto step = model.forward(at::full({1, 1}, id, ids_opts), at::full({1, 1}, t, ids_opts), cache);
        cache = std::move(step.cache);
        rotation.appended(t, 1);
        next = t + 1;
        return step.logits;
      },
      [&] { cache = rotation.compress(*compressor, cache, next); }, [&] { return cache; });
}

/// Prefills `prompt` in one call, compresses, then generates `new_tokens` greedily with
/// compression after every step. TTFT = prefill + compression + first token; TPOT = the rest.
/// The generation measurements time a warm process, as a serving loop sees it: one untimed
/// prefill of the same shape runs first (cuBLAS heuristics, allocator growth, TorchScript's
/// profiling executor and its fusion compiler under --jit-optimize).
inline void measure_generation(ContractModel& model, const Compressor* compressor,
                               const std::vector<int64_t>& prompt, int64_t new_tokens, RunMetrics& m,
                               const std::vector<int64_t>& baseline_skip = {0, 1},
                               PositionRule positions = PositionRule::original) {
  c10::InferenceMode guard;
  detail::RotationTracker rotation(model, positions);
  const auto ids_opts = at::TensorOptions().dtype(at::kLong).device(model.device());
  const int64_t p = static_cast<int64_t>(prompt.size());
  at::Tensor ids = at::tensor(prompt, at::TensorOptions().dtype(at::kLong)).to(model.device()).unsqueeze(0);
  const at::Tensor prompt_positions = at::arange(p, ids_opts).unsqueeze(0);
  model.forward(ids, prompt_positions, model.empty_cache());  // untimed warm-up (see above)
  auto start = std::chrono::steady_clock::now();
  auto step = model.forward(ids, prompt_positions, model.empty_cache());
  rotation.appended(0, p);
  KVCache cache = compressor ? rotation.compress(*compressor, step.cache, p) : std::move(step.cache);
  int64_t next = step.logits.select(0, 0).select(0, -1).argmax().item<int64_t>();
  m.gen_ttft_s += detail::seconds_since(start);
  detail::DecodeMarks marks(model.device());
  for (int64_t i = 1; i < new_tokens; ++i) {
    start = std::chrono::steady_clock::now();
    step = model.forward(at::full({1, 1}, next, ids_opts), at::full({1, 1}, p + i - 1, ids_opts), cache);
    rotation.appended(p + i - 1, 1);
    marks.stepped();
    if (compressor) {
      cache = rotation.compress(*compressor, step.cache, p + i);
      marks.compressed();
    } else {
      cache = std::move(step.cache);
    }
    next = step.logits.select(0, 0).select(0, -1).argmax().item<int64_t>();
    m.gen_later_s += detail::seconds_since(start);
    ++m.gen_later_steps;
  }
  marks.record(m);
  m.gen_tokens += new_tokens;
  m.gen_cache_tokens = detail::first_compressed_layer_tokens(cache, compressor, baseline_skip);
}

/// How the fixed-capacity runtime runs: compression schedule and CUDA graphs.
struct StaticOptions {
  Schedule schedule = Schedule::every();
  bool cuda_graph = false;
  /// Tokens per prefill step of the generation measurement (0 = the whole prompt at once).
  int64_t prefill_chunk = 0;
};

/// evaluate_sample on a fixed-capacity cache through the model's `step` (same metrics; with
/// the every-step schedule the kept tokens are exactly those of evaluate_sample).
inline KVCache evaluate_sample_static(ContractModel& model, const Compressor* compressor,
                                      const std::vector<int64_t>& tokens, RunMetrics& m, const StaticOptions& so,
                                      const std::vector<int64_t>& baseline_skip = {0, 1},
                                      const Progress& progress = nullptr) {
  c10::InferenceMode guard;
  const auto ids_opts = at::TensorOptions().dtype(at::kLong).device(model.device());
  const int64_t n = static_cast<int64_t>(tokens.size());
  StaticDecoder decoder(model, 1, peak_lengths(compressor, model.info().num_layers, n, 1, so.schedule),
                        so.cuda_graph);
  decoder.prepare();
  return detail::token_loop(
      compressor, tokens, m, baseline_skip, progress,
      [&](int64_t id, int64_t t) { return decoder.step(at::full({1, 1}, id, ids_opts), t); },
      [&] { decoder.cache().maybe_compress(*compressor, so.schedule); },
      [&] { return decoder.cache().view(); });
}

/// measure_generation on a fixed-capacity cache, for `batch` copies of the prompt: prefill
/// through `step`, compress, then one-token steps (graph replays when enabled).
inline void measure_generation_static(ContractModel& model, const Compressor* compressor,
                                      const std::vector<int64_t>& prompt, int64_t new_tokens, int64_t batch,
                                      RunMetrics& m, const StaticOptions& so,
                                      const std::vector<int64_t>& baseline_skip = {0, 1}) {
  c10::InferenceMode guard;
  const int64_t p = static_cast<int64_t>(prompt.size());
  StaticDecoder decoder(model, batch,
                        peak_lengths(compressor, model.info().num_layers, p + new_tokens, p, so.schedule),
                        so.cuda_graph);
  decoder.prepare();
  const at::Tensor ids = at::tensor(prompt, at::TensorOptions().dtype(at::kLong)).to(model.device())
                             .unsqueeze(0).expand({batch, p}).contiguous();
  decoder.prefill(ids, 0, so.prefill_chunk);  // untimed warm-up (see measure_generation)
  decoder.cache().clear();
  auto start = std::chrono::steady_clock::now();
  at::Tensor next = decoder.prefill(ids, 0, so.prefill_chunk).select(1, -1).argmax(-1, /*keepdim=*/true);  // [batch, 1]
  if (compressor) decoder.cache().maybe_compress(*compressor, so.schedule);
  next.sum().item<int64_t>();  // synchronise: the first token exists
  m.gen_ttft_s += detail::seconds_since(start);
  start = std::chrono::steady_clock::now();
  detail::DecodeMarks marks(model.device());
  for (int64_t i = 1; i < new_tokens; ++i) {
    next = decoder.step(next, p + i - 1).select(1, -1).argmax(-1, /*keepdim=*/true);
    marks.stepped();
    if (compressor) {
      decoder.cache().maybe_compress(*compressor, so.schedule);
      marks.compressed();
    }
  }
  if (new_tokens > 1) {
    next.sum().item<int64_t>();  // one synchronisation for the whole decode: no per-step stall
    m.gen_later_s += detail::seconds_since(start);
    m.gen_later_steps += new_tokens - 1;
  }
  marks.record(m);
  m.gen_tokens += new_tokens;
  m.gen_batch = batch;
  const KVCache cache = decoder.cache().view();
  m.gen_cache_tokens = detail::first_compressed_layer_tokens(cache, compressor, baseline_skip);
}

}  // namespace runtime
}  // namespace kvcompress
