#pragma once
// One-pass evaluation: several runs (the full cache, each method and budget) as the rows of one
// batch. Every row is fed the same text; each keeps its own fixed-capacity cache -- its own
// lengths per layer, positions, policy and schedule -- inside buffers the rows share, so that
// one model call per token serves them all (contract version 5's per-row lengths). A decode of
// a small model is bound by per-call overhead, not arithmetic: one call for R rows costs little
// more than one call for one row.
//
// Each row is a StaticDecoder over its slice of the shared buffers, so compression, positions
// and scoring are the separate pass's code; only the model call is shared. Rows differ from a
// separate pass by float rounding of the batched matrix products (and, for attention-aware
// policies, by scores computed from the queries after the step rather than inside it).
#include <kvcompress/runtime/evaluate.hpp>

#include <memory>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

class OnePass {
 public:
  /// One row per entry of `runs` (each of batch 1: a row is one sequence), with buffers sized
  /// for `total` tokens fed one at a time. `cuda_graph` replays the batch's step from a graph.
  OnePass(ContractModel& model, const std::vector<DecoderOptions>& runs, int64_t total, bool cuda_graph = false)
      : model_(model), use_graph_(cuda_graph) {
    const ModelInfo& info = model.info();
    if (runs.empty()) throw Error("one pass: no runs to evaluate");
    if (total < 1) throw Error("one pass: total tokens must be >= 1, got " + std::to_string(total));
    if (!model.has_step() || !info.per_row_lengths())
      throw Error("one pass: model '" + info.name + "' (contract version " + std::to_string(info.contract_version) +
                  ") cannot run caches of different lengths as the rows of one batch: that needs contract version "
                  "5's per-row lengths in `step`. Upgrade the file with examples/python/upgrade_contract.py, or "
                  "evaluate the methods one at a time (kvbench --no-one-pass)");
    if (cuda_graph && !model.device().is_cuda()) throw Error("CUDA graphs need the model on a CUDA device");
    if (cuda_graph && !built_with_cuda()) throw Error("CUDA graphs: this build of kvcompress::runtime has no CUDA support");
    const int64_t rows = static_cast<int64_t>(runs.size()), layers = info.num_layers;
    std::vector<int64_t> capacity(static_cast<size_t>(layers), 1);
    for (size_t r = 0; r < runs.size(); ++r) {
      if (runs[r].batch != 1)
        throw Error("one pass: run " + std::to_string(r) + " has batch " + std::to_string(runs[r].batch) +
                    "; each row is one sequence (batch 1)");
      const std::vector<int64_t> peak = peak_lengths(runs[r].compressor, layers, total, 1, runs[r].schedule);
      for (size_t l = 0; l < capacity.size(); ++l) capacity[l] = std::max(capacity[l], peak[l]);
    }
    const int64_t largest = *std::max_element(capacity.begin(), capacity.end());
    int64_t ring = 0;
    bool hides = false;
    for (const auto& run : runs) {
      if (!run.compressor) continue;
      const Needs needs = run.compressor->needs();
      // Rows score their attention from the ring after the step (see StaticDecoder's row
      // constructor): at least the last query, more for a window or a chunked schedule.
      ring = std::max({ring, StaticDecoder::ring_size(needs, run.schedule, largest), needs.attention ? int64_t{1} : 0});
      hides = hides || needs.hides;
    }
    const auto opts = at::TensorOptions().dtype(model.dtype()).device(model.device());
    try {
      for (int64_t c : capacity) {
        keys_.push_back(at::zeros({rows, info.num_heads, c, info.head_dim}, opts));
        values_.push_back(at::zeros({rows, info.num_heads, c, info.head_dim}, opts));
        if (hides) bias_.push_back(at::zeros({rows, info.num_heads, c}, opts));
        if (ring > 0) queries_.push_back(at::zeros({rows, info.num_heads, ring, info.head_dim}, opts));
      }
    } catch (const std::exception& e) {
      throw Error("one pass: cannot allocate the buffers of " + std::to_string(rows) + " rows of capacity " +
                  params::format_int_list(capacity) + " on " + model.device().str() + ": " + first_line(e));
    }
    for (int64_t r = 0; r < rows; ++r) {
      StaticCache::Storage storage;
      std::vector<at::Tensor> row_ring;
      const bool row_hides = runs[static_cast<size_t>(r)].compressor && runs[static_cast<size_t>(r)].compressor->needs().hides;
      for (int64_t l = 0; l < layers; ++l) {
        const size_t i = static_cast<size_t>(l);
        storage.keys.push_back(keys_[i].narrow(0, r, 1));
        storage.values.push_back(values_[i].narrow(0, r, 1));
        if (row_hides) storage.slot_bias.push_back(bias_[i].narrow(0, r, 1));
        if (ring > 0) row_ring.push_back(queries_[i].narrow(0, r, 1));
      }
      rows_.emplace_back(new StaticDecoder(model, runs[static_cast<size_t>(r)], StaticCache(std::move(storage)), false,
                                           &row_ring));
    }
    for (size_t l = 0; l < keys_.size(); ++l) {
      key_list_.push_back(keys_[l]);
      value_list_.push_back(values_[l]);
      if (hides) bias_list_.push_back(bias_[l]);
      if (ring > 0) query_list_.push_back(queries_[l]);
    }
    ring_ = ring;
    scored_ = hides || ring > 0;
    const auto long_opts = opts.dtype(at::kLong);
    ids_ = at::zeros({rows, 1}, long_opts);
    positions_ = at::zeros({layers, rows, 1}, long_opts);
    lengths_ = at::zeros({layers, rows}, long_opts);
    query_slots_ = at::zeros({ring > 0 ? 1 : 0}, long_opts);
  }

  int64_t rows() const { return static_cast<int64_t>(rows_.size()); }
  /// Row r as a decoder to look at (view, lengths, original positions, options).
  const Decoder& row(int64_t r) const { return *rows_.at(static_cast<size_t>(r)); }
  /// Tokens fed since the last reset (every row has been fed the same).
  int64_t fed() const { return rows_.front()->fed(); }
  ContractModel& model() const { return model_; }

  /// Feeds `token` to every row; returns float32 logits [rows, vocab]. Graph-replayed logits
  /// live in the graph's memory: read them before the next step.
  at::Tensor step(int64_t token) {
    for (auto& r : rows_) r->before_batch_step();
    upload_step_inputs(token);
    at::Tensor logits;
    if (use_graph_) {
      if (!graph_.captured()) graph_logits_ = graph_.capture([this] { return call(); });
      graph_.replay();
      logits = graph_logits_;
    } else {
      logits = call();
    }
    for (auto& r : rows_) r->after_batch_step();
    return logits.select(1, 0);
  }

  /// Compresses every row whose schedule says so (in row order); `compressed[r]` says whether
  /// row r did.
  void maybe_compress(std::vector<char>& compressed) {
    compressed.assign(rows_.size(), 0);
    for (size_t r = 0; r < rows_.size(); ++r) compressed[r] = rows_[r]->maybe_compress() ? 1 : 0;
  }

  /// Empties every row for a new sequence.
  void reset() {
    for (auto& r : rows_) r->reset();
  }

  /// Captures the CUDA graph now (when enabled), so that the first timed step does not pay for
  /// it. Writes nothing the next step would not.
  void prepare() {
    if (!use_graph_ || graph_.captured()) return;
    for (auto& r : rows_) r->before_batch_step();
    upload_step_inputs(0);
    graph_logits_ = graph_.capture([this] { return call(); });
  }

 private:
  at::Tensor call() {
    if (!scored_) return model_.step(ids_, positions_, key_list_, value_list_, lengths_);
    // Attention is never accumulated inside the batch's step (rows may decay it differently):
    // rows score it from the queries the step writes into their ring.
    return model_.step_scored(ids_, positions_, key_list_, value_list_, lengths_, c10::List<at::Tensor>(), 1.0,
                              query_list_, query_slots_, bias_list_);
  }

  // Every row's lengths and next positions into the buffers the step (or its graph) reads.
  void upload_step_inputs(int64_t token) {
    const int64_t rows = this->rows(), layers = static_cast<int64_t>(keys_.size());
    ids_.fill_(token);
    at::Tensor lengths = at::empty({layers, rows}, at::kLong), positions = at::empty({layers, rows, 1}, at::kLong);
    auto len = lengths.accessor<int64_t, 2>();
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<int64_t>& held = rows_[static_cast<size_t>(r)]->cache_.lengths();
      for (int64_t l = 0; l < layers; ++l) len[l][r] = held[static_cast<size_t>(l)];
      positions.select(1, r).select(1, 0).copy_(rows_[static_cast<size_t>(r)]->next_layer_positions());
    }
    StaticDecoder::copy_from_host(lengths_, lengths);
    StaticDecoder::copy_from_host(positions_, positions);
    if (ring_ > 0) StaticDecoder::copy_from_host(query_slots_, at::full({1}, fed() % ring_, at::kLong));
  }

  ContractModel& model_;
  std::vector<std::unique_ptr<StaticDecoder>> rows_;
  std::vector<at::Tensor> keys_, values_, bias_, queries_;  // per layer, all rows
  c10::List<at::Tensor> key_list_, value_list_, bias_list_, query_list_;
  at::Tensor ids_, positions_, lengths_, query_slots_, graph_logits_;
  int64_t ring_ = 0;
  bool scored_ = false, use_graph_ = false;
  CudaGraph graph_;
};

/// evaluate() for every row of `pass` at once: feed token t to all rows, score token t + 1 in
/// each, compress each row on its schedule. Adds row r's figures to `m[r]`. The step time of
/// every row is the batch's (one call serves all of them), and so are the windows' seconds and
/// peak memory; `eo.on_compressed` receives each row's decoder (pass.row(r)).
inline void evaluate_one_pass(OnePass& pass, const std::vector<int64_t>& tokens, std::vector<RunMetrics>& m,
                              const EvalOptions& eo = {}) {
  c10::InferenceMode guard;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const size_t rows = static_cast<size_t>(pass.rows());
  if (m.size() != rows)
    throw Error("evaluate_one_pass: " + std::to_string(m.size()) + " metrics for " + std::to_string(rows) + " rows");
  if (n < 2) throw Error("evaluate_one_pass: a sample needs at least 2 tokens, got " + std::to_string(n));
  if (eo.window < 0) throw Error("evaluate_one_pass: window must be >= 0, got " + std::to_string(eo.window));
  if (eo.window > n)
    throw Error("evaluate_one_pass: window " + std::to_string(eo.window) + " is longer than the sample (" +
                std::to_string(n) + " tokens)");
  pass.reset();
  pass.prepare();
  std::vector<WindowMetrics> win(rows);
  std::vector<char> compressed;
  auto window_start = std::chrono::steady_clock::now();
  auto open_windows = [&](int64_t start) {
    for (size_t r = 0; r < rows; ++r) {
      win[r] = WindowMetrics{};
      win[r].sample = m[r].samples;
      win[r].start = start;
    }
    if (eo.memory) eo.memory->reset();
    window_start = std::chrono::steady_clock::now();
  };
  auto close_windows = [&](int64_t end) {
    const double seconds = detail::seconds_since(window_start);
    const int64_t peak = eo.memory ? eo.memory->peak_bytes() : -1;
    for (size_t r = 0; r < rows; ++r) {
      const Decoder& d = pass.row(static_cast<int64_t>(r));
      win[r].end = end;
      win[r].cache_tokens = detail::first_compressed_layer_tokens(d.lengths(), d.options().compressor, eo.baseline_skip);
      win[r].seconds = seconds;
      win[r].peak_memory_bytes = peak;
      m[r].windows.push_back(win[r]);
    }
  };
  if (eo.window > 0) open_windows(0);
  const auto run_start = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor logits = pass.step(tokens[static_cast<size_t>(t)]);  // [rows, vocab]
    at::Tensor scored;
    if (t + 1 < n) {
      const int64_t next = tokens[static_cast<size_t>(t + 1)];
      const at::Tensor nll = at::logsumexp(logits, 1) - logits.select(1, next);
      scored = at::stack({nll.to(at::kDouble), logits.argmax(1).to(at::kDouble)});  // [2, rows]
    } else {
      scored = logits.sum().to(at::kDouble);  // last step: synchronise all the same
    }
    pass.maybe_compress(compressed);
    for (size_t r = 0; r < rows && eo.on_compressed; ++r)
      if (compressed[r]) eo.on_compressed(t, pass.row(static_cast<int64_t>(r)));
    const at::Tensor host = scored.to(at::kCPU);  // the step's one synchronisation
    if (t + 1 < n) {
      const auto h = host.accessor<double, 2>();
      const int64_t next = tokens[static_cast<size_t>(t + 1)];
      for (size_t r = 0; r < rows; ++r) {
        const double nll = h[0][static_cast<int64_t>(r)];
        const bool hit = static_cast<int64_t>(h[1][static_cast<int64_t>(r)]) == next;
        m[r].nll_sum += nll;
        m[r].hits += hit ? 1 : 0;
        ++m[r].scored;
        m[r].token_nll.push_back(nll);
        win[r].nll_sum += nll;
        win[r].hits += hit ? 1 : 0;
        ++win[r].scored;
      }
    }
    if (eo.window > 0 && ((t + 1) % eo.window == 0 || t + 1 == n)) {
      close_windows(t + 1);
      if (t + 1 < n) open_windows(t + 1);
    }
    if (eo.progress) eo.progress(t + 1, n);
  }
  const double step_s = detail::seconds_since(run_start) / static_cast<double>(n);
  for (size_t r = 0; r < rows; ++r) {
    const Decoder& d = pass.row(static_cast<int64_t>(r));
    RunMetrics& mr = m[r];
    mr.sample_step_s.push_back(step_s);
    mr.tokens += n;
    ++mr.samples;
    const std::vector<int64_t> lengths = d.lengths();
    mr.cache_tokens = detail::first_compressed_layer_tokens(lengths, d.options().compressor, eo.baseline_skip);
    mr.max_layer_tokens = std::max(mr.max_layer_tokens, *std::max_element(lengths.begin(), lengths.end()));
    detail::warn_about_context(mr, d, lengths);
    mr.cache_bytes = detail::cache_bytes(d.view());
  }
}

}  // namespace runtime
}  // namespace kvcompress
