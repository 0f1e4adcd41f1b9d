#pragma once
// Evaluation and generation, each written once over a Decoder (decoder.hpp), so both caches,
// both position rules and CUDA graphs share them.
//  - evaluate(): the course project's loop, exactly: feed token t, score token t + 1 from the
//    logits (NLL and top-1 hit), compress, repeat; optionally per-window figures for texts far
//    longer than the model's context (StreamingLLM's figure).
//  - generate(): prefill a prompt, then greedy steps with compression on the decoder's schedule.
#include <kvcompress/compressor.hpp>
#include <kvcompress/runtime/decoder.hpp>
#include <kvcompress/runtime/memory.hpp>
#include <kvcompress/runtime/timeline.hpp>

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

/// Quality and cost over tokens [start, end) of one sample: the tokens scored are those
/// predicted from positions start .. end - 1.
struct WindowMetrics {
  int64_t sample = 0, start = 0, end = 0;
  double nll_sum = 0;
  int64_t scored = 0, hits = 0;
  int64_t cache_tokens = 0;        ///< first compressed layer's tokens at the window's end
  int64_t peak_memory_bytes = -1;  ///< peak within the window (PeakMemory)
  double seconds = 0;              ///< host time of the window's steps
  double ppl() const { return std::exp(nll_sum / static_cast<double>(std::max<int64_t>(scored, 1))); }
  double accuracy() const { return static_cast<double>(hits) / static_cast<double>(std::max<int64_t>(scored, 1)); }
  double step_s() const { return seconds / static_cast<double>(std::max<int64_t>(end - start, 1)); }
};

/// Totals over the samples of one run (one method); the metrics are derived from them.
struct RunMetrics {
  double nll_sum = 0;
  int64_t scored = 0, hits = 0, tokens = 0, samples = 0;
  /// Mean host time of one evaluation step (feed a token, score the next, compress), per
  /// sample. Not a TTFT or TPOT: those are the generation measurement's (prompt prefill through
  /// the first new token; each new token after it).
  std::vector<double> sample_step_s;
  int64_t cache_tokens = 0, cache_bytes = 0, peak_memory_bytes = -1;
  /// Longest layer at the end of any sample (uncompressed layers keep growing).
  int64_t max_layer_tokens = 0;
  double gen_ttft_s = 0, gen_later_s = 0;
  int64_t gen_later_steps = 0, gen_tokens = 0, gen_cache_tokens = 0, gen_batch = 1;
  // Device clock (runtime/timeline.hpp) of the decode steps after the first: each step's time
  // including its compression, and the time spent compressing.
  std::vector<double> gen_step_s;
  double gen_compress_s = 0;
  /// NLL of every scored token, in order over the samples.
  std::vector<double> token_nll;
  std::vector<WindowMetrics> windows;
  /// Why a figure may mislead (positions past the model's context), for the report.
  std::vector<std::string> warnings;

  double ppl() const { return std::exp(nll_sum / static_cast<double>(std::max<int64_t>(scored, 1))); }
  double accuracy() const { return static_cast<double>(hits) / static_cast<double>(std::max<int64_t>(scored, 1)); }
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
  void warn(const std::string& w) {
    if (std::find(warnings.begin(), warnings.end(), w) == warnings.end()) warnings.push_back(w);
  }
};

using Progress = std::function<void(int64_t done, int64_t total)>;

/// What evaluate() records besides the totals.
struct EvalOptions {
  /// Layers reported as "uncompressed" for the full cache's cache size (kvbench's default
  /// skip_layers); a compressor reports its own.
  std::vector<int64_t> baseline_skip = {0, 1};
  Progress progress = nullptr;
  /// Called after each compression that happened, with the index of the token just fed (what
  /// `kvbench --trace` records: the decoder's original_positions()).
  std::function<void(int64_t step, const Decoder& decoder)> on_compressed = nullptr;
  /// Tokens per window of WindowMetrics (0 = none).
  int64_t window = 0;
  /// Peak memory per window, when given (it is reset at every window's start).
  PeakMemory* memory = nullptr;
};

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
inline int64_t first_compressed_layer_tokens(const std::vector<int64_t>& lengths, const Compressor* compressor,
                                             const std::vector<int64_t>& baseline_skip) {
  const std::vector<int64_t> skip = compressor ? compressor->skip_layers() : baseline_skip;
  for (size_t i = 0; i < lengths.size(); ++i)
    if (std::find(skip.begin(), skip.end(), static_cast<int64_t>(i)) == skip.end()) return lengths[i];
  return lengths.empty() ? 0 : lengths[0];
}

inline int64_t cache_bytes(const KVCache& cache) {
  int64_t bytes = 0;
  for (const auto& [k, v] : cache)
    bytes += static_cast<int64_t>(k.numel() * k.element_size() + v.numel() * v.element_size());
  return bytes;
}

/// Warnings for a run whose positions went past the model's training context.
inline void warn_about_context(RunMetrics& m, const Decoder& d, const std::vector<int64_t>& lengths) {
  const int64_t context = d.model().info().max_positions;
  if (d.options().positions == PositionRule::original) {
    if (d.fed() > context)
      m.warn("positions 'original': tokens past " + std::to_string(context) +
             " are fed at positions the model was not trained on (its max_positions); "
             "positions 'cache' keeps compressed layers inside the context");
    return;
  }
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  if (!d.options().compressor) {
    if (longest > context)
      m.warn("the full cache holds " + std::to_string(longest) + " tokens, past the model's context of " +
             std::to_string(context) + " positions: those positions are untrained, so perplexity rises");
    return;
  }
  std::vector<int64_t> over;
  for (size_t l = 0; l < lengths.size(); ++l)
    if (lengths[l] > context) over.push_back(static_cast<int64_t>(l));
  if (over.empty()) return;
  m.warn("positions 'cache': layer(s) " + params::format_int_list(over) + " grew to " +
         std::to_string(longest) + " tokens, past the model's context of " + std::to_string(context) +
         " positions (uncompressed: skip_layers or a budget above the context), so their positions are "
         "untrained and perplexity rises; compress them (e.g. --skip-layers '')");
}

}  // namespace detail

/// Token-by-token evaluation of one sample: for each token, step, score the next token, compress
/// (on the decoder's schedule). Adds to `m` and returns the final cache.
inline KVCache evaluate(Decoder& d, const std::vector<int64_t>& tokens, RunMetrics& m, const EvalOptions& eo = {}) {
  c10::InferenceMode guard;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < 2) throw Error("evaluate: a sample needs at least 2 tokens, got " + std::to_string(n));
  if (eo.window < 0) throw Error("evaluate: window must be >= 0, got " + std::to_string(eo.window));
  if (eo.window > n)
    throw Error("evaluate: window " + std::to_string(eo.window) + " is longer than the sample (" + std::to_string(n) +
                " tokens)");
  if (d.options().batch != 1) throw Error("evaluate: the decoder must have batch 1");
  d.reset();
  d.prepare();
  const Compressor* compressor = d.options().compressor;
  const auto ids_opts = at::TensorOptions().dtype(at::kLong).device(d.model().device());
  WindowMetrics win;
  auto window_start = std::chrono::steady_clock::now();
  auto close_window = [&](int64_t end) {
    win.end = end;
    win.cache_tokens = detail::first_compressed_layer_tokens(d.lengths(), compressor, eo.baseline_skip);
    win.seconds = detail::seconds_since(window_start);
    if (eo.memory) win.peak_memory_bytes = eo.memory->peak_bytes();
    m.windows.push_back(win);
  };
  auto open_window = [&](int64_t start) {
    win = WindowMetrics{};
    win.sample = m.samples;
    win.start = start;
    if (eo.memory) eo.memory->reset();
    window_start = std::chrono::steady_clock::now();
  };
  if (eo.window > 0) open_window(0);
  const auto run_start = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor logits_all = d.step(at::full({1, 1}, tokens[static_cast<size_t>(t)], ids_opts));
    at::Tensor scored;
    if (t + 1 < n) {
      const at::Tensor logits = logits_all.select(0, 0).select(0, -1);
      const at::Tensor nll = at::logsumexp(logits, 0) - logits[tokens[static_cast<size_t>(t + 1)]];
      scored = at::stack({nll.to(at::kDouble), logits.argmax().to(at::kDouble)});
    } else {
      scored = logits_all.sum().to(at::kDouble);  // last step: synchronise all the same
    }
    if (d.maybe_compress() && eo.on_compressed) eo.on_compressed(t, d);
    const at::Tensor host = scored.to(at::kCPU);  // the step's one synchronisation
    if (t + 1 < n) {
      const double nll = host[0].item<double>();
      const bool hit = static_cast<int64_t>(host[1].item<double>()) == tokens[static_cast<size_t>(t + 1)];
      m.nll_sum += nll;
      m.hits += hit ? 1 : 0;
      ++m.scored;
      m.token_nll.push_back(nll);
      win.nll_sum += nll;
      win.hits += hit ? 1 : 0;
      ++win.scored;
    }
    if (eo.window > 0 && ((t + 1) % eo.window == 0 || t + 1 == n)) {
      close_window(t + 1);
      if (t + 1 < n) open_window(t + 1);
    }
    if (eo.progress) eo.progress(t + 1, n);
  }
  m.sample_step_s.push_back(detail::seconds_since(run_start) / static_cast<double>(n));
  m.tokens += n;
  ++m.samples;
  const std::vector<int64_t> lengths = d.lengths();
  m.cache_tokens = detail::first_compressed_layer_tokens(lengths, compressor, eo.baseline_skip);
  m.max_layer_tokens = std::max(m.max_layer_tokens, *std::max_element(lengths.begin(), lengths.end()));
  detail::warn_about_context(m, d, lengths);
  KVCache cache = d.view();
  m.cache_bytes = detail::cache_bytes(cache);
  return cache;
}

/// The oracle of long-text evaluation (StreamingLLM's "sliding window with re-computation"):
/// every `window`-token window [s, e) is scored by one fresh forward over the `context` tokens
/// ending at e (positions 0 .., no cache carried over), so each token sees up to `context` - 1
/// predecessors at trained positions. Expensive for a server, the best a model of this context
/// can do on the text; a compressed cache is judged against it window by window.
inline void evaluate_recompute(ContractModel& model, const std::vector<int64_t>& tokens, int64_t window,
                               int64_t context, RunMetrics& m) {
  c10::InferenceMode guard;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (window < 1 || window > n) throw Error("evaluate_recompute: window must be in [1, " + std::to_string(n) + "]");
  if (context < window) throw Error("evaluate_recompute: context must be >= window");
  const auto ids_opts = at::TensorOptions().dtype(at::kLong).device(model.device());
  const auto run_start = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < n; s += window) {
    const auto window_start = std::chrono::steady_clock::now();
    const int64_t e = std::min(s + window, n), a = std::max<int64_t>(0, e - context);
    const at::Tensor ids = at::tensor(std::vector<int64_t>(tokens.begin() + a, tokens.begin() + e), at::kLong)
                               .to(model.device()).unsqueeze(0);
    const at::Tensor logits = model.forward(ids, at::arange(e - a, ids_opts).unsqueeze(0), model.empty_cache())
                                  .logits.select(0, 0);
    const int64_t last = std::min(e, n - 1);  // the text's last token predicts nothing
    WindowMetrics w;
    w.sample = m.samples;
    w.start = s;
    w.end = e;
    w.cache_tokens = e - a;
    if (last > s) {
      const at::Tensor rows = logits.narrow(0, s - a, last - s);
      const at::Tensor targets = at::tensor(std::vector<int64_t>(tokens.begin() + s + 1, tokens.begin() + last + 1),
                                            at::kLong).to(model.device());
      const at::Tensor nll = (at::logsumexp(rows, 1) - rows.gather(1, targets.unsqueeze(1)).squeeze(1)).to(at::kDouble).cpu();
      const at::Tensor hits = rows.argmax(1).eq(targets).sum().cpu();
      for (int64_t i = 0; i < last - s; ++i) m.token_nll.push_back(nll[i].item<double>());
      w.nll_sum = nll.sum().item<double>();
      w.scored = last - s;
      w.hits = hits.item<int64_t>();
    }
    w.seconds = detail::seconds_since(window_start);
    m.nll_sum += w.nll_sum;
    m.scored += w.scored;
    m.hits += w.hits;
    m.windows.push_back(w);
  }
  m.sample_step_s.push_back(detail::seconds_since(run_start) / static_cast<double>(n));
  m.tokens += n;
  ++m.samples;
  m.cache_tokens = std::min(context, n);
  m.max_layer_tokens = m.cache_tokens;
}

/// Greedy generation: prefill `prompt` (the same prompt in every row of the decoder's batch,
/// in pieces of `prefill_chunk` tokens, 0 = at once; `compress_prefill`: compressing between
/// them, Decoder::prefill; `shared_prompt`: fed to one row and copied to the others,
/// StaticDecoder::prefill_shared), compress, then `new_tokens` - 1 one-token
/// steps, compressing on the decoder's schedule. TTFT = prefill + compression + first token;
/// TPOT = the rest, with one synchronisation at the end (no per-step stall). A serving loop's
/// warm process: an untimed run of the same shapes goes first -- the prefill, its compression
/// and decode steps up to the first compression of the decode (cuBLAS heuristics, allocator
/// growth, TorchScript's profiling executor and its fuser, the GPU's first call of every
/// scoring and compaction kernel). Returns the generated ids [batch, new_tokens] on the host.
inline at::Tensor generate(Decoder& d, const std::vector<int64_t>& prompt, int64_t new_tokens, RunMetrics& m,
                           int64_t prefill_chunk = 0, const std::vector<int64_t>& baseline_skip = {0, 1},
                           bool compress_prefill = false, bool shared_prompt = false) {
  c10::InferenceMode guard;
  if (prompt.empty()) throw Error("generate: the prompt is empty");
  if (new_tokens < 1) throw Error("generate: new_tokens must be >= 1, got " + std::to_string(new_tokens));
  const int64_t batch = d.options().batch, p = static_cast<int64_t>(prompt.size());
  const at::Tensor one = at::tensor(prompt, at::TensorOptions().dtype(at::kLong)).to(d.model().device()).unsqueeze(0);
  // Every row's copy of the prompt, unless one row takes it for all.
  const at::Tensor ids = shared_prompt ? at::Tensor() : one.expand({batch, p}).contiguous();
  auto* fixed = dynamic_cast<StaticDecoder*>(&d);
  if (shared_prompt && !fixed)
    throw Error("generate: a shared prompt is fed to one row and copied: it needs the fixed-capacity cache");
  // The prompt, compressed as after any step (prefill_shared compresses the row it copies);
  // returns its first new token for every row: [batch, 1].
  auto prefill = [&] {
    const at::Tensor logits = shared_prompt ? fixed->prefill_shared(one, prefill_chunk, compress_prefill)
                                            : d.prefill(ids, prefill_chunk, compress_prefill);
    if (!shared_prompt) d.maybe_compress();
    return logits.select(1, -1).argmax(-1, /*keepdim=*/true).expand({batch, 1}).contiguous();
  };
  // Untimed (see above), twice: TorchScript's profiling executor profiles a shape on its first
  // call and specialises it on the second, so a single warm-up left that cost in the first
  // timed prefill (measured: 4 ms TTFT, first repeat 214 ms, on an H200).
  for (int round = 0; round < 2; ++round) {
    d.reset();
    at::Tensor w = prefill();
    for (int64_t i = 1; i < new_tokens; ++i) {  // two decode steps at least, up to a compression
      w = d.step_greedy(w);
      const bool compressed = d.maybe_compress();
      if (i >= 2 && (compressed || !d.options().compressor)) break;
    }
  }
  d.reset();
  d.prepare();
  // The generated ids, on the device: step_greedy's choice lives in the decoder's buffer.
  const at::Tensor out = at::empty({batch, new_tokens}, one.options());
  auto start = std::chrono::steady_clock::now();
  at::Tensor next = prefill();  // [batch, 1]
  out.narrow(1, 0, 1).copy_(next);
  next.sum().item<int64_t>();  // synchronise: the first token exists
  m.gen_ttft_s += detail::seconds_since(start);
  start = std::chrono::steady_clock::now();
  detail::DecodeMarks marks(d.model().device());
  for (int64_t i = 1; i < new_tokens; ++i) {
    next = d.step_greedy(next);
    out.narrow(1, i, 1).copy_(next);
    marks.stepped();
    if (d.options().compressor) {
      d.maybe_compress();
      marks.compressed();
    }
  }
  if (new_tokens > 1) {
    next.sum().item<int64_t>();  // one synchronisation for the whole decode
    m.gen_later_s += detail::seconds_since(start);
    m.gen_later_steps += new_tokens - 1;
  }
  marks.record(m);
  m.gen_tokens += new_tokens;
  m.gen_batch = batch;
  m.gen_cache_tokens = detail::first_compressed_layer_tokens(d.lengths(), d.options().compressor, baseline_skip);
  return out.to(at::kCPU);
}

}  // namespace runtime
}  // namespace kvcompress
