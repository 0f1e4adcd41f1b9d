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

#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
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
  /// Keep every slot's original position, for original_positions() (always kept by the
  /// fixed-capacity cache; the concatenating cache keeps them only when asked or when its
  /// policy scores with queries).
  bool track_positions = false;
  /// One-token steps in kvcompress's own CUDA kernels (ContractModel::native_step) instead of
  /// the model's TorchScript step; prompts still run through TorchScript. Fixed-capacity cache;
  /// not for policies that score with attention or queries (yet). On the CPU the same algorithm
  /// in ATen operators: a check of the kernels' arithmetic, not a faster CPU path.
  bool native_step = false;
};

class Decoder {
 public:
  Decoder(ContractModel& model, DecoderOptions options) : model_(model), options_(options) {
    if (options.batch < 1) throw Error("decoder: batch must be >= 1, got " + std::to_string(options.batch));
    if (options.compressor) {
      require_scores_from(model, *options.compressor);
      needs_ = options.compressor->needs();
    }
    scored_ = needs_.scores() || needs_.hides;
  }

  /// Throws kvcompress::Error when `compressor` scores with attention and `model` cannot
  /// provide it (a file older than contract version 3), or hides slots per head and `model`
  /// cannot mask them (older than version 4), naming the remedy.
  static void require_scores_from(const ContractModel& model, const Compressor& compressor) {
    const Needs needs = compressor.needs();
    const std::string remedy = "Upgrade the file with examples/python/upgrade_contract.py or re-export it "
                               "(export_pythia.py, export_small_model.py) to contract version ";
    const std::string which = "model '" + model.info().name + "' (contract version " +
                              std::to_string(model.info().contract_version) + ")";
    if (needs.scores() && !model.has_scored())
      throw Error(compressor.spec() + " scores with attention, which " + which +
                  " cannot provide: it has no forward_scored/step_scored. " + remedy + "3 or later");
    if (needs.hides && !model.has_slot_bias())
      throw Error(compressor.spec() + " hides slots per head, which " + which +
                  " cannot mask: its scored methods take no slot_bias. " + remedy + "4");
  }
  virtual ~Decoder() = default;
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  /// Feeds ids ([batch, T] int64 on the model's device) as the next T tokens of every row and
  /// returns float32 logits [batch, T, vocab]. Graph-replayed logits live in the graph's memory:
  /// read them before the next step.
  at::Tensor step(const at::Tensor& ids) { return feed(ids, &Decoder::run); }

  /// step() and the greedy choice: feeds ids ([batch, T] int64) and returns the id of each
  /// row's largest logit after the last of them, int64 [batch, 1] on the model's device (the
  /// next step's input). A graph-replayed one-token step makes the choice inside the graph, so
  /// a greedy decode launches no kernel of its own between replays; it returns the choice in the
  /// graph's input buffer: feeding it straight back costs no copy, keeping it past the next step
  /// needs one.
  at::Tensor step_greedy(const at::Tensor& ids) { return feed(ids, &Decoder::run_greedy); }

  /// step() over a prompt ([batch, P]) in pieces of `chunk` tokens (0 = all at once); returns
  /// the logits of the last piece. Pieces bound the prefill's transient memory (float32
  /// logits of every fed position, attention scores); the keys and values end up the same. (A
  /// step's attention is summed over its tokens and decayed once, so with a decay below 1 the
  /// accumulated scores depend on the pieces, as they would in the course project's loop.)
  ///
  /// `compress_between`: the schedule's compression also runs between the pieces (not after the
  /// last: the caller compresses as after any step), so that a prompt far longer than the
  /// budget fits in a cache of about the budget plus one piece; what is kept then differs from
  /// compressing once after the whole prompt, as in any streaming decode.
  at::Tensor prefill(const at::Tensor& ids, int64_t chunk, bool compress_between = false) {
    if (chunk < 0) throw Error("prefill: chunk must be >= 0, got " + std::to_string(chunk));
    const int64_t p = ids.size(1);
    if (chunk == 0 || chunk >= p) return step(ids);
    at::Tensor logits;
    for (int64_t s = 0; s < p; s += chunk) {
      if (compress_between && s > 0) maybe_compress();
      logits = step(ids.narrow(1, s, std::min(chunk, p - s)).contiguous());
    }
    return logits;
  }

  /// Compresses when there is a compressor and the schedule says so (every step, or once
  /// `slack` tokens arrived since the last compression); returns whether it did.
  bool maybe_compress() {
    if (!options_.compressor) return false;
    if (!options_.schedule.due(since_compression_)) return false;
    const c10::NoGradGuard no_grad;
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
  /// Original position (index in the text) of every slot of `layer`, int64 [batch, heads, len]:
  /// which tokens the cache kept. The concatenating cache needs DecoderOptions::track_positions.
  virtual at::Tensor original_positions(int64_t layer) const = 0;

  /// Tokens fed since the last reset (the next token's index in the text).
  int64_t fed() const { return fed_; }
  const DecoderOptions& options() const { return options_; }
  ContractModel& model() const { return model_; }

 protected:
  /// Runs the model on t new tokens at the positions the rule gives.
  virtual at::Tensor run(const at::Tensor& ids, int64_t t) = 0;
  /// run() and the greedy choice after its last token ([batch, 1]).
  virtual at::Tensor run_greedy(const at::Tensor& ids, int64_t t) {
    return run(ids, t).select(1, -1).argmax(-1, /*keepdim=*/true);
  }
  virtual void compress_now() = 0;
  virtual void clear() = 0;

  /// Feeds ids ([batch, T] int64) through `how` (run or run_greedy) and counts them.
  at::Tensor feed(const at::Tensor& ids, at::Tensor (Decoder::*how)(const at::Tensor&, int64_t)) {
    const c10::NoGradGuard no_grad;  // a decoder never trains: no autograd history, in any caller's mode
    if (ids.dim() != 2 || ids.size(0) != options_.batch || ids.size(1) < 1 || ids.scalar_type() != at::kLong)
      throw Error("decoder step: ids must be int64 [" + std::to_string(options_.batch) + ", T >= 1], got " +
                  detail::shape_text(ids) + " " + std::string(c10::toString(ids.scalar_type())));
    const int64_t t = ids.size(1);
    at::Tensor out = (this->*how)(ids, t);
    advance(t);
    return out;
  }

  /// Counts t tokens fed.
  void advance(int64_t t) {
    fed_ += t;
    since_compression_ += t;
  }
  /// How many recent queries the policy scores with (0 = none).
  int64_t window() const { return needs_.queries; }
  /// Original positions of the policy's window of queries now, oldest first.
  at::Tensor window_positions() const { return at::arange(fed_ - std::min(fed_, window()), fed_, at::kLong); }

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
  Needs needs_;          // what the compressor scores with besides keys
  bool scored_ = false;  // the model's scored methods run (scores or hidden slots)
  int64_t fed_ = 0, since_compression_ = 0;
};

/// The concatenating cache through the model's `forward`: each step returns a cache one token
/// longer; each compression replaces it (exactly compressor.compress(cache) under the original
/// rule, as the course project ran). For attention-aware policies it calls `forward_scored` and
/// keeps, per layer, the accumulated attention and original position of every slot and the
/// last queries, all moved with their tokens.
class ConcatDecoder final : public Decoder {
 public:
  ConcatDecoder(ContractModel& model, DecoderOptions options) : Decoder(model, options) {
    if (options.native_step)
      throw Error("native step: it runs over the fixed-capacity cache (StaticDecoder), not the concatenating one");
    clear();
  }

  KVCache view() const override { return cache_; }
  std::vector<int64_t> lengths() const override {
    std::vector<int64_t> out;
    for (const auto& kv : cache_) out.push_back(kv.first.size(2));
    return out;
  }
  at::Tensor original_positions(int64_t layer) const override {
    if (!tracks_positions())
      throw Error("ConcatDecoder: original positions are not kept (set DecoderOptions::track_positions)");
    if (layer < 0 || layer >= static_cast<int64_t>(key_positions_.size()))
      throw Error("ConcatDecoder: layer " + std::to_string(layer) + " out of range");
    return key_positions_[static_cast<size_t>(layer)];
  }

 protected:
  at::Tensor run(const at::Tensor& ids, int64_t t) override {
    if (!scored_) {
      auto out = model_.forward(ids, positions_for(t), cache_);
      cache_ = std::move(out.cache);
      if (tracks_positions()) append_positions(t);
      return out.logits;
    }
    c10::List<at::Tensor> bias;  // none until a compression has hidden something: no masked attention
    for (size_t l = 0; l < slot_bias_.size() && hidden_present_; ++l) bias.push_back(slot_bias_[l]);
    auto out = model_.forward_scored(ids, positions_for(t), cache_, needs_.attention, window(), bias);
    for (size_t l = 0; l < cache_.size(); ++l) {
      if (needs_.hides)  // the new tokens are visible
        slot_bias_[l] = at::cat({slot_bias_[l], at::zeros({options_.batch, model_.info().num_heads, t},
                                                          slot_bias_[l].options())}, 2);
      if (needs_.attention) {  // decay * old + new, the formula of the model's step_scored
        at::Tensor a = out.attention[l];
        const int64_t past = cache_[l].first.size(2);
        if (past > 0) a.narrow(2, 0, past).add_(attention_[l], needs_.decay);
        attention_[l] = a;
      }
      if (window() > 0) {
        at::Tensor q = at::cat({queries_[l], out.queries[l]}, 2);
        queries_[l] = q.narrow(2, q.size(2) - std::min(q.size(2), window()), std::min(q.size(2), window()));
      }
    }
    if (tracks_positions()) append_positions(t);
    cache_ = std::move(out.cache);
    return out.logits;
  }

  // One loop for both position rules and every policy: select, move the memory (and what is
  // kept per slot), re-rotate under the cache rule. Under the original rule this is exactly
  // compressor.compress(cache).
  void compress_now() override {
    const Compressor& c = *options_.compressor;
    const int64_t n = static_cast<int64_t>(cache_.size());
    for (int64_t l = 0; l < n; ++l) {
      const size_t i = static_cast<size_t>(l);
      auto& [keys, values] = cache_[i];
      LayerView v{keys, l, n};
      if (needs_.values) v.values = values;
      if (needs_.attention) v.attention = attention_[i];
      if (window() > 0) {
        v.queries = queries_[i];
        v.query_positions = window_positions();
        v.key_positions = key_positions_[i];
      }
      if (needs_.hides) v.hidden = slot_bias_[i].lt(0);
      std::optional<Selection> s = c.select(v);
      if (!s) continue;
      hidden_present_ |= s->hidden().defined();
      LayerKV kept = apply_selection(keys, values, *s);
      if (options_.positions == PositionRule::cache) rotate_to_slots(kept.first, *s);
      if (needs_.attention) attention_[i] = take_slots(attention_[i], *s);
      if (tracks_positions()) key_positions_[i] = take_slots(key_positions_[i], *s);
      if (needs_.hides)
        slot_bias_[i] = s->hidden().defined()
                            ? at::zeros(s->hidden().sizes(), slot_bias_[i].options())
                                  .masked_fill_(s->hidden(), -std::numeric_limits<double>::infinity())
                            : take_slots(slot_bias_[i], *s);
      cache_[i] = std::move(kept);
    }
  }

  void clear() override {
    cache_ = model_.empty_cache(options_.batch);
    attention_.clear();
    queries_.clear();
    key_positions_.clear();
    slot_bias_.clear();
    hidden_present_ = false;
    const auto& info = model_.info();
    const auto opts = at::TensorOptions().device(model_.device());
    for (int64_t l = 0; l < info.num_layers && needs_.hides; ++l)
      slot_bias_.push_back(at::zeros({options_.batch, info.num_heads, 0}, opts.dtype(model_.dtype())));
    for (int64_t l = 0; l < info.num_layers && needs_.scores(); ++l) {
      attention_.push_back(at::zeros({options_.batch, info.num_heads, 0}, opts.dtype(at::kFloat)));
      queries_.push_back(at::zeros({options_.batch, info.num_heads, 0, info.head_dim}, opts.dtype(model_.dtype())));
    }
    for (int64_t l = 0; l < info.num_layers && tracks_positions(); ++l)
      key_positions_.push_back(at::zeros({options_.batch, info.num_heads, 0}, opts.dtype(at::kLong)));
  }

 private:
  // Original positions per slot: the policy's query window needs them, a trace asks for them.
  bool tracks_positions() const { return window() > 0 || options_.track_positions; }
  void append_positions(int64_t t) {
    const at::Tensor fresh = at::arange(fed_, fed_ + t, at::TensorOptions().dtype(at::kLong).device(model_.device()))
                                 .expand({options_.batch, model_.info().num_heads, t});
    for (auto& p : key_positions_) p = at::cat({p, fresh}, 2);
  }

  KVCache cache_;
  std::vector<at::Tensor> attention_, queries_, key_positions_;  // per layer, when the policy scores
  std::vector<at::Tensor> slot_bias_;  // per layer, when the policy hides slots: 0 visible, -inf hidden
  bool hidden_present_ = false;        // some slot is hidden (the masks are not all 0)
};

/// Largest length every layer reaches when `total` tokens arrive (the first `first_chunk` at
/// once -- or, `piece` > 0, in pieces of `piece` tokens with the schedule's compression after
/// each, as prefill(ids, piece, true) feeds them -- then one by one) and `compressor` runs on
/// `schedule`. `prefill_apart`: the prompt is fed elsewhere and arrives compressed (as
/// StaticDecoder::prefill_shared copies it), so only the lengths from then on count. Selections
/// depend only on lengths, so this is exact: it sizes the buffers of a StaticDecoder. Each
/// (layer, length) is asked of the policy once: past its budget a layer cycles through the same
/// few lengths, so a long text costs a handful of probes per layer instead of one per token.
inline std::vector<int64_t> peak_lengths(const Compressor* compressor, int64_t num_layers, int64_t total,
                                         int64_t first_chunk, const Schedule& schedule, int64_t piece = 0,
                                         bool prefill_apart = false) {
  if (piece < 0) throw Error("peak_lengths: piece must be >= 0, got " + std::to_string(piece));
  std::vector<int64_t> len(static_cast<size_t>(num_layers), 0), peak(static_cast<size_t>(num_layers), 0);
  std::map<std::pair<int64_t, int64_t>, int64_t> kept;  // (layer, length) -> tokens kept
  auto note_peak = [&] {
    for (size_t i = 0; i < len.size(); ++i) peak[i] = std::max(peak[i], len[i]);
  };
  int64_t since = 0;
  const int64_t first = std::max<int64_t>(1, std::min(first_chunk, total));
  for (int64_t done = 0; done < total;) {
    const int64_t t = done >= first ? 1 : piece > 0 ? std::min(piece, first - done) : first;
    done += t;
    since += t;
    for (auto& l : len) l += t;
    if (!prefill_apart || done > first) note_peak();
    if (compressor && schedule.due(since)) {
      since = 0;
      for (int64_t i = 0; i < num_layers; ++i) {
        int64_t& l = len[static_cast<size_t>(i)];
        auto it = kept.find({i, l});
        if (it == kept.end()) it = kept.emplace(std::make_pair(i, l), kept_tokens(*compressor, i, num_layers, l)).first;
        l = it->second;
      }
    }
    if (prefill_apart && done == first) note_peak();  // the prompt as it arrives: after its compression
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
      : StaticDecoder(model, options,
                      StaticCache(model.info().num_layers, options.batch, model.info().num_heads, model.info().head_dim,
                                  std::move(capacity), at::TensorOptions().dtype(model.dtype()).device(model.device())),
                      cuda_graph, nullptr) {}

 private:
  friend class OnePass;

  // A row of a OnePass batch (`ring` given, maybe empty): the cache lives in the batch's
  // buffers and the queries' ring in `ring` (per layer [1, H, W, D], W the same for all rows),
  // and the batch's model call replaces run(). Its accumulated attention is always scored from
  // the ring (deferred): the rows of one call may decay theirs differently.
  StaticDecoder(ContractModel& model, DecoderOptions options, StaticCache cache, bool cuda_graph,
                const std::vector<at::Tensor>* ring)
      : Decoder(model, options), cache_(std::move(cache)), use_graph_(cuda_graph) {
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
    if (needs_.attention) {
      cache_.track_attention();
      for (int64_t l = 0; l < layers; ++l) attention_list_.push_back(cache_.attention_buffer(l));
    }
    if (needs_.hides) {  // compaction rewrites the masks in place: a captured graph reads them
      cache_.track_hidden();
      for (int64_t l = 0; l < layers; ++l) bias_list_.push_back(cache_.slot_bias_buffer(l));
    }
    if (options.native_step) {
      if (ring)
        throw Error("native step: one-pass rows run their group's TorchScript step (evaluate the methods one at a "
                    "time to use the native step)");
      if (needs_.scores())
        throw Error("native step: " + options.compressor->spec() + " scores with attention or recent queries, which "
                    "the native step does not compute yet; run it on the TorchScript step");
      native_ = &model.native_step();
    }
    // Under a chunked schedule the accumulated attention is not added inside every step: the
    // steps only keep their queries (one small write per layer), and the attention of all the
    // queries since the last compression is computed at once when it is next needed
    // (flush_attention). The same scores, a fraction of the per-step kernels.
    deferred_ = needs_.attention && ((options.schedule.kind == Schedule::chunked && options.schedule.slack > 1) || ring);
    int64_t largest = 0;
    for (int64_t l = 0; l < layers; ++l) largest = std::max(largest, cache_.capacity(l));
    ring_ = ring ? (ring->empty() ? 0 : ring->front().size(2)) : ring_size(needs_, options.schedule, largest);
    if (ring && ring_ < std::max<int64_t>(window(), deferred_ ? 1 : 0))
      throw Error("StaticDecoder: a query ring of " + std::to_string(ring_) + " slots is too small for " +
                  options.compressor->spec());
    query_slots_ = at::zeros({ring_ > 0 ? 1 : 0}, long_opts);
    for (int64_t l = 0; l < layers && ring_ > 0; ++l) {
      query_buffers_.push_back(ring ? (*ring)[static_cast<size_t>(l)]
                                    : at::zeros({options.batch, model.info().num_heads, ring_, model.info().head_dim},
                                                at::TensorOptions().dtype(model.dtype()).device(model.device())));
      query_list_.push_back(query_buffers_.back());
    }
  }

  // Queries a decoder keeps: the policy's window, or under a chunked schedule (deferred
  // attention) those since the last compression. Pending queries never outnumber the tokens a
  // layer can hold, so the ring need not be larger than the largest capacity, whatever the slack.
  static int64_t ring_size(const Needs& needs, const Schedule& schedule, int64_t largest) {
    const bool deferred = needs.attention && schedule.kind == Schedule::chunked && schedule.slack > 1;
    return std::max(needs.queries, deferred ? std::min(schedule.slack, largest) : 0);
  }

  // OnePass's step for this row: what run() does before and after the model call.
  void before_batch_step() {
    cache_.require_room(1);
    if (deferred_ && fed_ - flushed_ >= ring_) flush_attention();
  }
  void after_batch_step() {
    cache_.commit_step(1, fed_);
    advance(1);
  }
  // Position of the next token in every layer, [num_layers] on the host.
  at::Tensor next_layer_positions() const {
    return next_positions(options_.positions, fed_, cache_.lengths(), 1, 1, true, at::kCPU).view({-1})
        .expand({cache_.num_layers()});
  }

 public:

  /// The cache, its accumulated attention brought up to date. Compress through the decoder
  /// (maybe_compress): compacting the cache directly would misplace attention still pending.
  StaticCache& cache() {
    if (deferred_) flush_attention();
    return cache_;
  }
  /// The cache as it is; under a chunked schedule its attention may lag the last steps.
  const StaticCache& cache() const { return cache_; }
  KVCache view() const override { return cache_.view(); }
  std::vector<int64_t> lengths() const override { return cache_.lengths(); }
  at::Tensor original_positions(int64_t layer) const override { return cache_.positions(layer); }

  /// Feeds one prompt that every row shares ([1, P] ids) at the cost of one row: one row takes
  /// it as prefill(ids, chunk, compress_between) would, is compressed as after any step (when
  /// the schedule says so: the caller does not compress again), and every row gets its cache
  /// (StaticCache::copy_to_every_row). The row is row 0 of this decoder's buffers when they hold
  /// the prompt's peak, else a buffer of its own for that peak: rows sized for the decode alone
  /// (make_decoder(..., shared_prompt)) then still take a prompt far longer. Returns the row's
  /// logits of the last piece. The decoder must be empty. Not for policies that score with
  /// attention or queries or hide slots per head: their scores and query rings are per row.
  at::Tensor prefill_shared(const at::Tensor& ids, int64_t chunk, bool compress_between = false) {
    if (fed_ != 0) throw Error("prefill_shared: the decoder already holds " + std::to_string(fed_) + " tokens (reset it)");
    if (ids.dim() != 2 || ids.size(0) != 1 || ids.size(1) < 1 || ids.scalar_type() != at::kLong)
      throw Error("prefill_shared: ids must be int64 [1, P >= 1] (one prompt for every row), got " +
                  detail::shape_text(ids));
    if (scored_)
      throw Error("prefill_shared: " + options_.compressor->spec() + " keeps per-row scores or queries; feed the "
                  "prompt to every row with prefill");
    const int64_t p = ids.size(1), layers = cache_.num_layers();
    const std::vector<int64_t> need =
        peak_lengths(options_.compressor, layers, p, p, options_.schedule, compress_between ? chunk : 0);
    bool fits = true;
    for (int64_t l = 0; l < layers; ++l) fits &= need[static_cast<size_t>(l)] <= cache_.capacity(l);
    DecoderOptions one = options_;
    one.batch = 1;
    one.native_step = false;  // prompts run through TorchScript in any case
    auto views_of_row0 = [&] {
      StaticCache::Storage row0;
      for (int64_t l = 0; l < layers; ++l) {
        row0.keys.push_back(cache_.key_buffer(l).narrow(0, 0, 1));
        row0.values.push_back(cache_.value_buffer(l).narrow(0, 0, 1));
      }
      return StaticCache(std::move(row0));
    };
    StaticDecoder row = fits ? StaticDecoder(model_, one, views_of_row0(), false, nullptr) : StaticDecoder(model_, one, need);
    const at::Tensor logits = row.prefill(ids, chunk, compress_between);
    row.maybe_compress();
    cache_.copy_to_every_row(row.cache_);
    fed_ = row.fed_;
    since_compression_ = row.since_compression_;
    return logits;
  }

  /// Captures the CUDA graph now (when enabled), so that the first timed step does not pay for
  /// it. Needs one free slot in every layer; writes nothing the next step would not.
  void prepare() override {
    if (!use_graph_ || graph_.captured()) return;
    const c10::NoGradGuard no_grad;
    upload_step_inputs();
    capture();
  }

 protected:
  at::Tensor run(const at::Tensor& ids, int64_t t) override {
    cache_.require_room(t);  // before the model writes past the valid slots
    // Pending queries are scored before the ring would overwrite them, and before a multi-token
    // step, which adds its attention inside the model.
    if (deferred_ && (t > 1 || fed_ - flushed_ >= ring_)) flush_attention();
    at::Tensor logits;
    if (t == 1) {
      if (!ids.is_same(ids_)) ids_.copy_(ids);  // step_greedy's choice is already there
      upload_step_inputs();
      if (use_graph_) {
        if (!graph_.captured()) capture();
        graph_.replay();
        logits = graph_logits_;
      } else {
        logits = call(ids_, positions_, query_slots_);
      }
    } else {
      upload_lengths();
      // A prompt's mask over every slot is [B, H, T, C]: passed only once slots are hidden.
      logits = call(ids, positions_for(t), ring_ > 0 ? ring_slots(t).to(model_.device()) : query_slots_, true,
                    hidden_present_);
      if (deferred_) flushed_ = fed_ + t;
    }
    cache_.commit_step(t, fed_);
    return logits;
  }

  // A graph chooses inside itself (capture()); without one, the choice goes where a graph's
  // would, so that both return the same buffer.
  at::Tensor run_greedy(const at::Tensor& ids, int64_t t) override {
    if (t != 1) return Decoder::run_greedy(ids, t);
    const at::Tensor logits = run(ids, 1);
    if (!use_graph_) choose_greedily(logits);
    return ids_;
  }

  void compress_now() override {
    if (deferred_) flush_attention();
    hidden_present_ |= needs_.hides;
    RecentQueries recent;
    if (window() > 0) {  // the policy's window from the ring, oldest first
      recent.positions = window_positions();
      const at::Tensor order = recent.positions.remainder(ring_).to(model_.device());
      for (const auto& q : query_buffers_) recent.per_layer.push_back(q.index_select(2, order));
    }
    const RecentQueries* queries = window() > 0 ? &recent : nullptr;
    if (options_.positions == PositionRule::original) {
      cache_.compress(*options_.compressor, nullptr, queries);
      return;
    }
    cache_.compress(*options_.compressor, [this](int64_t l, const Selection& s) {
      rotate_to_slots(cache_.key_buffer(l).narrow(2, 0, s.kept()), s);
    }, queries);
  }

  void clear() override {
    cache_.clear();
    flushed_ = 0;
    hidden_present_ = false;
  }

 private:
  // Ring slots of the last min(t, ring) of t tokens about to be fed: token i at slot i % ring.
  at::Tensor ring_slots(int64_t t) const {
    const int64_t n = std::min(t, ring_);
    return at::arange(fed_ + t - n, fed_ + t, at::kLong).remainder(std::max<int64_t>(ring_, 1));
  }

  // The plain step, or the scored one when the policy scores with attention or queries or hides
  // slots (the accumulated attention inside the model unless it is deferred; `add_attention`
  // forces it; `with_bias` false leaves out the masks of hidden slots, when there are none).
  at::Tensor call(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& query_slots,
                  bool add_attention = false, bool with_bias = true) {
    if (native_ && ids.size(1) == 1)
      return native_->step(ids, positions, key_list_, value_list_, lengths_,
                           with_bias ? bias_list_ : c10::List<at::Tensor>());
    if (!scored_) return model_.step(ids, positions, key_list_, value_list_, lengths_);
    const bool in_model = needs_.attention && (!deferred_ || add_attention);
    return model_.step_scored(ids, positions, key_list_, value_list_, lengths_,
                              in_model ? attention_list_ : c10::List<at::Tensor>(), needs_.decay, query_list_,
                              query_slots, with_bias ? bias_list_ : c10::List<at::Tensor>());
  }

  // Adds the attention of the n queries fed since the last flush to the accumulated scores, as
  // n steps would have: score <- decay^n * score + sum_i decay^(n-1-i) * attention_i. Nothing
  // was compacted in between, so each query sees the slots whose tokens are not later than it:
  // window_attention over the cache's positions, as the window-scoring policies use it.
  void flush_attention() {
    const int64_t n = fed_ - flushed_;
    if (n <= 0) return;
    const auto dev = model_.device();
    // On the device: a host tensor would cost a synchronising copy in every layer.
    const at::Tensor positions = at::arange(flushed_, fed_, at::TensorOptions().dtype(at::kLong).device(dev));
    const at::Tensor order = positions.remainder(ring_);
    const at::Tensor weights = at::pow(at::full({n}, needs_.decay, at::kDouble),
                                       at::arange(n - 1, -1, -1, at::kDouble)).to(at::kFloat).to(dev).view({1, 1, n, 1});
    const std::vector<int64_t> skip = options_.compressor->skip_layers();
    constexpr int64_t kBlock = 64;  // queries scored together: bounds the [B, H, block, len] scores
    for (int64_t l = 0; l < cache_.num_layers(); ++l) {
      if (std::find(skip.begin(), skip.end(), l) != skip.end()) continue;  // never compressed: no scores needed
      const at::Tensor keys = cache_.key_buffer(l).narrow(2, 0, cache_.length(l));
      LayerView view{keys, l, cache_.num_layers()};
      view.key_positions = cache_.positions(l);
      if (cache_.tracks_hidden()) view.hidden = cache_.hidden(l);  // masked as the model masks them
      at::Tensor added;
      for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
        const int64_t m = std::min(kBlock, n - b0);
        view.queries = query_buffers_[static_cast<size_t>(l)].index_select(2, order.narrow(0, b0, m));
        view.query_positions = positions.narrow(0, b0, m);
        at::Tensor part = window_attention(view).mul_(weights.narrow(2, b0, m)).sum(2);
        added = added.defined() ? added.add_(part) : part;
      }
      cache_.attention(l).mul_(std::pow(needs_.decay, static_cast<double>(n))).add_(added);
    }
    flushed_ = fed_;
  }

  // The greedy choice of a one-token step's logits, into the step's input buffer.
  void choose_greedily(const at::Tensor& logits) { at::argmax_out(ids_, logits.select(1, -1), -1, /*keepdim=*/true); }

  // Records the one-token step on the graph's input buffers, and after it the greedy choice
  // (step_greedy's; for step() a kernel over [batch, vocab] whose result run() overwrites).
  // The capture's warm-up runs execute the step: harmless for K/V and queries (the same values
  // to the same slots), but each would add its attention to the accumulated scores and choose
  // over the ids it read, so those are put back afterwards.
  void capture() {
    std::vector<at::Tensor> scores;
    for (size_t i = 0; i < attention_list_.size(); ++i) scores.push_back(attention_list_.get(i).clone());
    const at::Tensor fed = ids_.clone();
    graph_logits_ = graph_.capture([this] {
      at::Tensor logits = call(ids_, positions_, query_slots_);
      choose_greedily(logits);
      return logits;
    });
    for (size_t i = 0; i < scores.size(); ++i) attention_list_.get(i).copy_(scores[i]);
    ids_.copy_(fed);
  }

  // Valid lengths to the device. On CUDA from pinned memory without blocking: the caching host
  // allocator keeps each staging buffer alive until its copy has run, so the host never waits.
  void upload_lengths() { copy_from_host(lengths_, at::tensor(cache_.lengths(), at::kLong)); }

  // The one-token step's lengths and positions into the buffers a graph reads, without a host
  // wait: one fill under the original rule, one pinned copy under the cache rule.
  void upload_step_inputs() {
    upload_lengths();
    if (ring_ > 0) copy_from_host(query_slots_, ring_slots(1));
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
  at::Tensor ids_, positions_, lengths_, graph_logits_, query_slots_;
  c10::List<at::Tensor> key_list_, value_list_, attention_list_, query_list_, bias_list_;
  std::vector<at::Tensor> query_buffers_;  // per layer, a ring of the last ring_ queries
  int64_t ring_ = 0;                       // its size: the policy's window, or the slack when deferred
  bool deferred_ = false;                  // accumulated attention computed at flush_attention()
  bool hidden_present_ = false;            // a compression may have hidden slots since the reset
  int64_t flushed_ = 0;                    // tokens whose attention the scores hold
  NativeStep* native_ = nullptr;           // the model's native step (DecoderOptions::native_step)
  CudaGraph graph_;
};

/// A decoder of either kind: `fixed_capacity` false -> ConcatDecoder; true -> StaticDecoder
/// with buffers sized exactly for `total` tokens whose first `first_chunk` arrive at once (or,
/// `piece` > 0, in pieces with compression between: prefill(ids, piece, true)); with
/// `shared_prompt`, for the decode after a prompt fed by StaticDecoder::prefill_shared alone.
inline std::unique_ptr<Decoder> make_decoder(ContractModel& model, const DecoderOptions& options, bool fixed_capacity,
                                             int64_t total, int64_t first_chunk, bool cuda_graph = false,
                                             int64_t piece = 0, bool shared_prompt = false) {
  if (!fixed_capacity) {
    if (cuda_graph) throw Error("CUDA graphs need the fixed-capacity cache");
    return std::make_unique<ConcatDecoder>(model, options);
  }
  return std::make_unique<StaticDecoder>(
      model, options,
      peak_lengths(options.compressor, model.info().num_layers, total, first_chunk, options.schedule, piece, shared_prompt),
      cuda_graph);
}

}  // namespace runtime
}  // namespace kvcompress
