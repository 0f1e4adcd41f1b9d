#pragma once
// One decode interface over a contract model and its KV cache: feed tokens, compress on a
// schedule, look at the cache. Two implementations:
//  - ConcatDecoder: the model's `forward`, a cache of tensors that grows by concatenation and
//    is replaced by each compression (the course project's runtime; any contract model);
//  - StaticDecoder: the model's `step` writing into a kvcompress::StaticCache (buffers
//    allocated once, compacted in place), optionally replaying one-token steps from a CUDA graph.
// Both apply the position rule (positions.hpp) the same way, so evaluation and generation
// (evaluate.hpp) are written once over this interface.
#include <kvcompress/cache.hpp>
#include <kvcompress/runtime/device.hpp>
#include <kvcompress/runtime/model.hpp>
#include <kvcompress/runtime/positions.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

/// How a decoder runs. `compressor` null = the full cache (nothing is ever evicted).
struct DecoderOptions {
  const Compressor* compressor = nullptr;
  PositionRule positions = PositionRule::original;
  Schedule schedule = Schedule::every();
  int64_t batch = 1;
};

class Decoder {
 public:
  Decoder(ContractModel& model, DecoderOptions options) : model_(model), options_(options) {
    if (options.batch < 1) throw Error("decoder: batch must be >= 1, got " + std::to_string(options.batch));
  }
  virtual ~Decoder() = default;
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  /// Feeds ids ([batch, T] int64 on the model's device) as the next T tokens of every row and
  /// returns float32 logits [batch, T, vocab]. Graph-replayed logits live in the graph's memory:
  /// read them before the next step.
  at::Tensor step(const at::Tensor& ids) {
    if (ids.dim() != 2 || ids.size(0) != options_.batch || ids.size(1) < 1 || ids.scalar_type() != at::kLong)
      throw Error("decoder step: ids must be int64 [" + std::to_string(options_.batch) + ", T >= 1], got " +
                  detail::shape_text(ids) + " " + std::string(c10::toString(ids.scalar_type())));
    const int64_t t = ids.size(1);
    at::Tensor logits = run(ids, t);
    fed_ += t;
    since_compression_ += t;
    return logits;
  }

  /// step() over a prompt ([batch, P]) in pieces of `chunk` tokens (0 = all at once); returns
  /// the logits of the last piece. Pieces bound the prefill's transient memory (float32
  /// logits of every fed position, attention scores); the cache ends up the same.
  at::Tensor prefill(const at::Tensor& ids, int64_t chunk) {
    if (chunk < 0) throw Error("prefill: chunk must be >= 0, got " + std::to_string(chunk));
    const int64_t p = ids.size(1);
    if (chunk == 0 || chunk >= p) return step(ids);
    at::Tensor logits;
    for (int64_t s = 0; s < p; s += chunk) logits = step(ids.narrow(1, s, std::min(chunk, p - s)).contiguous());
    return logits;
  }

  /// Compresses when there is a compressor and the schedule says so (every step, or once
  /// `slack` tokens arrived since the last compression); returns whether it did.
  bool maybe_compress() {
    if (!options_.compressor) return false;
    if (!options_.schedule.due(since_compression_)) return false;
    compress_now();
    since_compression_ = 0;
    return true;
  }

  /// Empties the cache for a new sequence.
  void reset() {
    fed_ = 0;
    since_compression_ = 0;
    clear();
  }

  /// Readies what the first timed step would otherwise pay for (a CUDA graph's capture).
  virtual void prepare() {}

  /// The valid cache of every layer ([batch, heads, len_l, head_dim]).
  virtual KVCache view() const = 0;
  /// Tokens held per layer.
  virtual std::vector<int64_t> lengths() const = 0;

  /// Tokens fed since the last reset (the next token's index in the text).
  int64_t fed() const { return fed_; }
  const DecoderOptions& options() const { return options_; }
  ContractModel& model() const { return model_; }

 protected:
  /// Runs the model on t new tokens at the positions the rule gives.
  virtual at::Tensor run(const at::Tensor& ids, int64_t t) = 0;
  virtual void compress_now() = 0;
  virtual void clear() = 0;

  at::Tensor positions_for(int64_t t) const {
    // Layer lengths matter only under the cache rule: not gathered per step otherwise.
    const std::vector<int64_t> held = options_.positions == PositionRule::cache ? lengths() : std::vector<int64_t>{};
    return next_positions(options_.positions, fed_, held, options_.batch, t, model_.info().per_layer_positions(),
                          model_.device());
  }
  bool positions_per_layer() const {
    return options_.positions == PositionRule::cache && model_.info().per_layer_positions();
  }
  void rotate_to_slots(const at::Tensor& kept_keys, const Selection& s) const {
    rotate_kept_keys_to_slots(kept_keys, s, model_.info().rotary_ndims, model_.info().rotary_base);
  }

  ContractModel& model_;
  DecoderOptions options_;
  int64_t fed_ = 0, since_compression_ = 0;
};

/// The concatenating cache through the model's `forward`: each step returns a cache one token
/// longer; each compression replaces it (exactly compressor.compress(cache) under the original
/// rule, as the course project ran).
class ConcatDecoder final : public Decoder {
 public:
  ConcatDecoder(ContractModel& model, DecoderOptions options)
      : Decoder(model, options), cache_(model.empty_cache(options.batch)) {}

  KVCache view() const override { return cache_; }
  std::vector<int64_t> lengths() const override {
    std::vector<int64_t> out;
    for (const auto& kv : cache_) out.push_back(kv.first.size(2));
    return out;
  }

 protected:
  at::Tensor run(const at::Tensor& ids, int64_t t) override {
    auto out = model_.forward(ids, positions_for(t), cache_);
    cache_ = std::move(out.cache);
    return out.logits;
  }

  void compress_now() override {
    const Compressor& c = *options_.compressor;
    if (options_.positions == PositionRule::original) {
      cache_ = c.compress(cache_);
      return;
    }
    const int64_t n = static_cast<int64_t>(cache_.size());
    for (int64_t l = 0; l < n; ++l) {
      auto& [keys, values] = cache_[static_cast<size_t>(l)];
      std::optional<Selection> s = c.select(LayerView{keys, l, n});
      if (!s) continue;
      LayerKV kept = apply_selection(keys, values, *s);
      rotate_to_slots(kept.first, *s);
      cache_[static_cast<size_t>(l)] = std::move(kept);
    }
  }

  void clear() override { cache_ = model_.empty_cache(options_.batch); }

 private:
  KVCache cache_;
};

/// Largest length every layer reaches when `total` tokens arrive (the first `first_chunk` at
/// once, then one by one) and `compressor` runs on `schedule`. Selections depend only on
/// lengths, so this is exact: it sizes the buffers of a StaticDecoder.
inline std::vector<int64_t> peak_lengths(const Compressor* compressor, int64_t num_layers, int64_t total,
                                         int64_t first_chunk, const Schedule& schedule) {
  std::vector<int64_t> len(static_cast<size_t>(num_layers), 0), peak(static_cast<size_t>(num_layers), 0);
  const at::Tensor probe = at::zeros({1, 1, total, 1});  // values do not change selected counts
  int64_t since = 0;
  for (int64_t done = 0; done < total;) {
    const int64_t t = done == 0 ? std::min(first_chunk, total) : 1;
    done += t;
    since += t;
    for (auto& l : len) l += t;
    for (size_t i = 0; i < len.size(); ++i) peak[i] = std::max(peak[i], len[i]);
    if (!compressor || !schedule.due(since)) continue;
    since = 0;
    for (int64_t i = 0; i < num_layers; ++i) {
      auto s = compressor->select(LayerView{probe.narrow(2, 0, len[static_cast<size_t>(i)]), i, num_layers});
      if (s) len[static_cast<size_t>(i)] = s->kept();
    }
  }
  return peak;
}

/// The fixed-capacity cache through the model's `step`: shapes are static, so a one-token step
/// is one graph launch; compression runs between launches and compacts the buffers in place.
class StaticDecoder final : public Decoder {
 public:
  /// Buffers of `capacity[l]` slots per layer (one value = every layer; peak_lengths() gives
  /// the exact need). `cuda_graph` replays one-token steps from a graph captured on first use.
  StaticDecoder(ContractModel& model, DecoderOptions options, std::vector<int64_t> capacity, bool cuda_graph = false)
      : Decoder(model, options),
        cache_(model.info().num_layers, options.batch, model.info().num_heads, model.info().head_dim,
               std::move(capacity), at::TensorOptions().dtype(model.dtype()).device(model.device())),
        use_graph_(cuda_graph) {
    if (!model.has_step())
      throw Error("the model has no `step` method (fixed-capacity caches, CUDA graphs); re-export it with "
                  "examples/python/export_pythia.py or export_small_model.py");
    if (cuda_graph && !model.device().is_cuda()) throw Error("CUDA graphs need the model on a CUDA device");
    if (cuda_graph && !built_with_cuda())
      throw Error("CUDA graphs: this build of kvcompress::runtime has no CUDA support");
    const int64_t layers = model.info().num_layers;
    const auto long_opts = at::TensorOptions().dtype(at::kLong).device(model.device());
    ids_ = at::zeros({options.batch, 1}, long_opts);
    positions_ = positions_per_layer() ? at::zeros({layers, options.batch, 1}, long_opts)
                                       : at::zeros({options.batch, 1}, long_opts);
    lengths_ = at::zeros({layers}, long_opts);
    for (int64_t l = 0; l < layers; ++l) {
      key_list_.push_back(cache_.key_buffer(l));
      value_list_.push_back(cache_.value_buffer(l));
    }
  }

  StaticCache& cache() { return cache_; }
  const StaticCache& cache() const { return cache_; }
  KVCache view() const override { return cache_.view(); }
  std::vector<int64_t> lengths() const override { return cache_.lengths(); }

  /// Captures the CUDA graph now (when enabled), so that the first timed step does not pay for
  /// it. Needs one free slot in every layer; writes nothing the next step would not.
  void prepare() override {
    if (!use_graph_ || graph_.captured()) return;
    upload_step_inputs();
    capture();
  }

 protected:
  at::Tensor run(const at::Tensor& ids, int64_t t) override {
    cache_.require_room(t);  // before the model writes past the valid slots
    at::Tensor logits;
    if (t == 1) {
      ids_.copy_(ids);
      upload_step_inputs();
      if (use_graph_) {
        if (!graph_.captured()) capture();
        graph_.replay();
        logits = graph_logits_;
      } else {
        logits = call(ids_, positions_);
      }
    } else {
      upload_lengths();
      logits = call(ids, positions_for(t));
    }
    cache_.commit_step(t, fed_);
    return logits;
  }

  void compress_now() override {
    if (options_.positions == PositionRule::original) {
      cache_.compress(*options_.compressor);
      return;
    }
    cache_.compress(*options_.compressor, [this](int64_t l, const Selection& s) {
      rotate_to_slots(cache_.key_buffer(l).narrow(2, 0, s.kept()), s);
    });
  }

  void clear() override { cache_.clear(); }

 private:
  at::Tensor call(const at::Tensor& ids, const at::Tensor& positions) {
    return model_.step(ids, positions, key_list_, value_list_, lengths_);
  }

  // Records the one-token step on the graph's input buffers.
  void capture() { graph_logits_ = graph_.capture([this] { return call(ids_, positions_); }); }

  // Valid lengths to the device. On CUDA from pinned memory without blocking: the caching host
  // allocator keeps each staging buffer alive until its copy has run, so the host never waits.
  void upload_lengths() { copy_from_host(lengths_, at::tensor(cache_.lengths(), at::kLong)); }

  // The one-token step's lengths and positions into the buffers a graph reads, without a host
  // wait: one fill under the original rule, one pinned copy under the cache rule.
  void upload_step_inputs() {
    upload_lengths();
    if (options_.positions == PositionRule::original) {
      positions_.fill_(fed_);
      return;
    }
    copy_from_host(positions_, next_positions(options_.positions, fed_, cache_.lengths(), options_.batch, 1,
                                              model_.info().per_layer_positions(), at::kCPU));
  }

  static void copy_from_host(at::Tensor& dst, at::Tensor host) {
    if (dst.is_cuda()) host = host.pin_memory();
    dst.copy_(host, /*non_blocking=*/true);
  }

  StaticCache cache_;
  bool use_graph_;
  at::Tensor ids_, positions_, lengths_, graph_logits_;
  c10::List<at::Tensor> key_list_, value_list_;
  CudaGraph graph_;
};

/// A decoder of either kind: `fixed_capacity` false -> ConcatDecoder; true -> StaticDecoder
/// with buffers sized exactly for `total` tokens whose first `first_chunk` arrive at once.
inline std::unique_ptr<Decoder> make_decoder(ContractModel& model, const DecoderOptions& options, bool fixed_capacity,
                                             int64_t total, int64_t first_chunk, bool cuda_graph = false) {
  if (!fixed_capacity) {
    if (cuda_graph) throw Error("CUDA graphs need the fixed-capacity cache");
    return std::make_unique<ConcatDecoder>(model, options);
  }
  return std::make_unique<StaticDecoder>(
      model, options, peak_lengths(options.compressor, model.info().num_layers, total, first_chunk, options.schedule),
      cuda_graph);
}

}  // namespace runtime
}  // namespace kvcompress
