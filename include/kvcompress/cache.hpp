#pragma once
// A fixed-capacity KV cache: per-layer buffers allocated once, valid lengths, the original
// position of every slot, and compression that compacts the kept entries in place. Decode steps
// then have static shapes (what CUDA graphs need), and no cache-sized memory is allocated per
// step.
#include <kvcompress/compressor.hpp>

#include <c10/core/GradMode.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace kvcompress {

/// When a cache compresses (StaticCache::maybe_compress, the runtime's decoders).
struct Schedule {
  enum Kind { every_step, chunked } kind = every_step;
  /// chunked: compress once `slack` tokens have been appended since the last compression, so
  /// the cost of one compression is spread over `slack` steps.
  int64_t slack = 0;

  /// Whether to compress now, `since` tokens having arrived since the last compression.
  bool due(int64_t since) const { return kind == every_step || since >= slack; }

  static Schedule every() { return {every_step, 0}; }
  static Schedule chunk(int64_t slack) {
    if (slack < 1) throw Error("chunked schedule: slack must be >= 1, got " + std::to_string(slack));
    return {chunked, slack};
  }
};

/// The most recent queries of every layer, oldest first, for policies that score with them
/// (Needs::queries): `per_layer[l]` [batch, heads, W, head_dim], `positions` int64 [W].
struct RecentQueries {
  std::vector<at::Tensor> per_layer;
  at::Tensor positions;
};

class StaticCache {
 public:
  /// `capacity[l]` slots for layer l (one value = every layer): skipped layers must hold the
  /// whole sequence, compressed ones their budget plus whatever is appended between compressions.
  StaticCache(int64_t num_layers, int64_t batch, int64_t heads, int64_t head_dim,
              std::vector<int64_t> capacity, at::TensorOptions options)
      : batch_(batch), heads_(heads), head_dim_(head_dim) {
    if (num_layers < 1 || batch < 1 || heads < 1 || head_dim < 1)
      throw Error("StaticCache: layers, batch, heads and head_dim must be >= 1");
    if (capacity.size() == 1) capacity.assign(static_cast<size_t>(num_layers), capacity[0]);
    if (static_cast<int64_t>(capacity.size()) != num_layers)
      throw Error("StaticCache: " + std::to_string(capacity.size()) + " capacities for " +
                  std::to_string(num_layers) + " layers");
    if (!options.has_dtype() || !detail::is_supported_dtype(options.dtype().toScalarType()))
      throw Error("StaticCache: dtype must be float32, float16, bfloat16 or float64");
    for (int64_t c : capacity)
      if (c < 1) throw Error("StaticCache: capacity must be >= 1, got " + std::to_string(c));
    try {
      for (int64_t c : capacity) {
        check_elements(batch, heads, c, head_dim);
        keys_.push_back(at::zeros({batch, heads, c, head_dim}, options));
        values_.push_back(at::zeros({batch, heads, c, head_dim}, options));
      }
      allocate_bookkeeping();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {  // out of memory, most often (c10::Error or std::bad_alloc)
      std::string why = e.what();
      if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) why = c10e->what_without_backtrace();
      throw Error("StaticCache: cannot allocate buffers of capacity " + params::format_int_list(capacity) +
                  " (batch " + std::to_string(batch) + ", heads " + std::to_string(heads) + ", head_dim " +
                  std::to_string(head_dim) + ") on " + options.device().str() + ": " + why.substr(0, why.find('\n')));
    }
  }

  /// Buffers a caller owns, for a cache that lives inside them: per layer keys and values
  /// [batch, heads, C_l, head_dim] (one row of a larger batch, say, that the caller's model call
  /// writes into) and, optionally, the masks track_hidden() then uses ([batch, heads, C_l] in the
  /// keys' dtype). Views are fine: compaction writes through them.
  struct Storage {
    std::vector<at::Tensor> keys, values, slot_bias;
  };

  /// A cache over caller-owned buffers (OnePass runs each row of its batch in one); the slots'
  /// positions and the scratch space are its own.
  explicit StaticCache(Storage storage) {
    const size_t n = storage.keys.size();
    if (n == 0 || storage.values.size() != n || (!storage.slot_bias.empty() && storage.slot_bias.size() != n))
      throw Error("StaticCache: storage needs as many value buffers (and slot_bias buffers, if any) as key buffers, "
                  "at least one; got " + std::to_string(n) + " keys, " + std::to_string(storage.values.size()) +
                  " values, " + std::to_string(storage.slot_bias.size()) + " slot_bias");
    const at::Tensor& first = storage.keys[0];
    if (first.dim() != 4 || !detail::is_supported_dtype(first.scalar_type()))
      throw Error("StaticCache: storage keys must be [batch, heads, capacity, head_dim] float32, float16, bfloat16 "
                  "or float64, got " + detail::shape_text(first) + " " + std::string(c10::toString(first.scalar_type())));
    batch_ = first.size(0);
    heads_ = first.size(1);
    head_dim_ = first.size(3);
    auto like_first = [&first](const at::Tensor& t) {
      return t.scalar_type() == first.scalar_type() && t.device() == first.device();
    };
    for (size_t l = 0; l < n; ++l) {
      const at::Tensor& k = storage.keys[l];
      const at::Tensor& v = storage.values[l];
      const bool ok = k.dim() == 4 && k.size(0) == batch_ && k.size(1) == heads_ && k.size(2) >= 1 &&
                      k.size(3) == head_dim_ && v.sizes() == k.sizes() && like_first(k) && like_first(v) &&
                      (storage.slot_bias.empty() || (storage.slot_bias[l].sizes() == k.sizes().slice(0, 3) &&
                                                     like_first(storage.slot_bias[l])));
      if (!ok)
        throw Error("StaticCache: storage layer " + std::to_string(l) + ": keys " + detail::shape_text(k) +
                    " and values " + detail::shape_text(v) + " must be [" + std::to_string(batch_) + ", " +
                    std::to_string(heads_) + ", capacity >= 1, " + std::to_string(head_dim_) +
                    "] like layer 0's, with its dtype and device (slot_bias [batch, heads, capacity])");
    }
    keys_ = std::move(storage.keys);
    values_ = std::move(storage.values);
    given_bias_ = std::move(storage.slot_bias);
    allocate_bookkeeping();
  }

  int64_t num_layers() const { return static_cast<int64_t>(keys_.size()); }
  int64_t capacity(int64_t layer) const { return keys_[at(layer)].size(2); }
  int64_t length(int64_t layer) const { return lengths_[at(layer)]; }
  const std::vector<int64_t>& lengths() const { return lengths_; }

  /// Whole buffers, [batch, heads, capacity, head_dim]: stable addresses for a model's step
  /// method and for CUDA-graph capture. Slots at and after length(layer) hold stale data.
  const at::Tensor& key_buffer(int64_t layer) const { return keys_[at(layer)]; }
  const at::Tensor& value_buffer(int64_t layer) const { return values_[at(layer)]; }
  /// Keeps an accumulated-attention score per slot from now on (Needs::attention): float32
  /// buffers [batch, heads, capacity] that a model's scored step adds into, moved with their
  /// tokens by every compaction; slots past the valid ones hold 0. Idempotent.
  void track_attention() {
    if (!attention_.empty()) return;
    const auto opts = keys_[0].options().dtype(at::kFloat);
    for (const auto& k : keys_) attention_.push_back(at::zeros({batch_, heads_, k.size(2)}, opts));
    att_scratch_ = at::empty({batch_, heads_, scratch_.size(2), 1}, opts);
  }
  bool tracks_attention() const { return !attention_.empty(); }
  /// Whole score buffer of a layer, [batch, heads, capacity] (stable address, like key_buffer).
  const at::Tensor& attention_buffer(int64_t layer) const {
    if (attention_.empty()) throw Error("StaticCache: attention is not tracked (call track_attention())");
    return attention_[at(layer)];
  }
  /// Accumulated attention of the valid slots, [batch, heads, length].
  at::Tensor attention(int64_t layer) const { return attention_buffer(layer).narrow(2, 0, length(layer)); }
  /// score <- decay * score + step_attention over the valid slots (for callers that compute
  /// attention themselves; a contract model's scored step does this inside the model).
  void accumulate_attention(int64_t layer, const at::Tensor& step_attention, double decay) {
    const at::Tensor valid = attention(layer);
    if (step_attention.sizes() != valid.sizes())
      throw Error("StaticCache::accumulate_attention: layer " + std::to_string(layer) + ": expected " +
                  detail::shape_text(valid) + ", got " + detail::shape_text(step_attention));
    valid.copy_(at::add(step_attention.to(valid.options()), valid, decay));
  }

  /// Keeps which slots are hidden from attention from now on (per-head budgets, Needs::hides;
  /// compress() starts it for such a policy): buffers [batch, heads, capacity] in the cache's
  /// dtype, 0 where a head may attend and -inf where its budget evicted the token, moved with
  /// their tokens by every compaction; new slots are visible. Idempotent.
  void track_hidden() {
    if (!slot_bias_.empty()) return;
    for (const auto& b : given_bias_) slot_bias_.push_back(b.zero_());
    for (size_t l = slot_bias_.size(); l < keys_.size(); ++l)
      slot_bias_.push_back(at::zeros({batch_, heads_, keys_[l].size(2)}, keys_[l].options()));
    bias_scratch_ = at::empty({batch_, heads_, scratch_.size(2), 1}, keys_[0].options());
  }
  bool tracks_hidden() const { return !slot_bias_.empty(); }
  /// Whole additive attention mask of a layer, [batch, heads, capacity] (stable address): what
  /// a model's step adds to its attention scores (contract version 4's slot_bias).
  const at::Tensor& slot_bias_buffer(int64_t layer) const {
    if (slot_bias_.empty()) throw Error("StaticCache: hidden slots are not tracked (call track_hidden())");
    return slot_bias_[at(layer)];
  }
  /// Which valid slots are hidden, bool [batch, heads, length] (all false when not tracked).
  at::Tensor hidden(int64_t layer) const {
    if (slot_bias_.empty()) return at::zeros({batch_, heads_, length(layer)}, keys_[0].options().dtype(at::kBool));
    return slot_bias_[at(layer)].narrow(2, 0, length(layer)).lt(0);
  }

  /// Original token position of every valid slot, [batch, heads, length].
  at::Tensor positions(int64_t layer) const {
    write_pending_positions(layer);
    return positions_[at(layer)].narrow(2, 0, length(layer));
  }

  /// The valid part of every layer as views (no copy): the cache as the functional API sees it.
  KVCache view() const {
    KVCache kv;
    for (int64_t l = 0; l < num_layers(); ++l)
      kv.emplace_back(keys_[at(l)].narrow(2, 0, length(l)), values_[at(l)].narrow(2, 0, length(l)));
    return kv;
  }

  /// Copies T new tokens ([batch, heads, T, head_dim]) with original positions
  /// `first_position .. first_position + T - 1` into the slots after the valid ones.
  void append(int64_t layer, const at::Tensor& keys, const at::Tensor& values, int64_t first_position) {
    at(layer);
    detail::validate_layer(keys, values, static_cast<size_t>(layer), "StaticCache::append");
    const int64_t t = keys.size(2);
    if (keys.size(0) != batch_ || keys.size(1) != heads_ || keys.size(3) != head_dim_)
      throw Error("StaticCache::append: layer " + std::to_string(layer) + ": expected [" +
                  std::to_string(batch_) + ", " + std::to_string(heads_) + ", T, " +
                  std::to_string(head_dim_) + "], got " + detail::shape_text(keys));
    if (keys.scalar_type() != keys_[0].scalar_type() || keys.device() != keys_[0].device())
      throw Error("StaticCache::append: layer " + std::to_string(layer) + ": tokens are " +
                  std::string(c10::toString(keys.scalar_type())) + " on " + keys.device().str() + ", the cache " +
                  std::string(c10::toString(keys_[0].scalar_type())) + " on " + keys_[0].device().str());
    check_positions("StaticCache::append", t, first_position);
    require_room_in(layer, t);
    const int64_t len = lengths_[at(layer)];
    keys_[at(layer)].narrow(2, len, t).copy_(keys);
    values_[at(layer)].narrow(2, len, t).copy_(values);
    record(layer, first_position, t);
  }

  /// Throws kvcompress::Error unless every layer has room for `t` more tokens (a caller whose
  /// model writes into the buffers itself checks before the write).
  void require_room(int64_t t) const {
    for (int64_t l = 0; l < num_layers(); ++l) require_room_in(l, t);
  }

  /// Records that a model's step wrote T tokens with positions first_position.. into the slots
  /// after the valid ones of every layer (the buffers were filled in place).
  void commit_step(int64_t t, int64_t first_position) {
    check_positions("StaticCache::commit_step", t, first_position);
    require_room(t);
    for (int64_t l = 0; l < num_layers(); ++l) record(l, first_position, t);
  }

  /// Called after layer `layer` was compacted with `selection`: slot j now holds the token that
  /// was in slot selection.positions(...)[..., j] (a position rule re-rotates keys here).
  using OnCompacted = std::function<void(int64_t layer, const Selection& selection)>;

  /// Compresses every layer with `compressor`, compacting the kept tokens (in selection order)
  /// to the front of each buffer; positions, accumulated attention and hidden slots move with
  /// their tokens. Keeps exactly what compressor.compress(view()) keeps. `queries` feeds
  /// policies that score with recent queries.
  void compress(const Compressor& compressor, const OnCompacted& on_compacted = nullptr,
                const RecentQueries* queries = nullptr) {
    // Moving memory is no computation to differentiate (and the out= gather refuses keys that
    // require grad in grad mode, as a model's outputs do).
    const c10::NoGradGuard no_grad;
    const int64_t n = num_layers();
    const Needs needs = compressor.needs();
    if (needs.hides) track_hidden();
    uncompressed_ = compressor.skip_layers();
    uncompressed_by_ = compressor.spec();
    for (int64_t l = 0; l < n; ++l) {
      const int64_t len = lengths_[at(l)];
      const at::Tensor valid_keys = keys_[at(l)].narrow(2, 0, len);
      LayerView view{valid_keys, l, n};
      if (needs.values) view.values = values_[at(l)].narrow(2, 0, len);
      if (needs.attention && tracks_attention()) view.attention = attention(l);
      if (needs.queries > 0) {
        view.key_positions = positions(l);
        if (queries && static_cast<int64_t>(queries->per_layer.size()) == n) {
          view.queries = queries->per_layer[at(l)];
          view.query_positions = queries->positions;
        }
      }
      if (needs.hides) view.hidden = hidden(l);
      std::optional<Selection> s = compressor.select(view);
      if (!s) continue;
      write_pending_positions(l);
      compact(keys_[at(l)], len, *s, scratch_);
      compact(values_[at(l)], len, *s, scratch_);
      compact(positions_[at(l)].unsqueeze(-1), len, *s, pos_scratch_.unsqueeze(-1));
      if (tracks_attention()) {
        compact(attention_[at(l)].unsqueeze(-1), len, *s, att_scratch_);
        attention_[at(l)].narrow(2, s->kept(), capacity(l) - s->kept()).zero_();  // new tokens start at 0
      }
      if (tracks_hidden()) {
        const at::Tensor& bias = slot_bias_[at(l)];
        if (s->hidden().defined()) {
          bias.narrow(2, 0, s->kept()).zero_().masked_fill_(s->hidden(), -std::numeric_limits<double>::infinity());
        } else {
          compact(bias.unsqueeze(-1), len, *s, bias_scratch_);
        }
        bias.narrow(2, s->kept(), capacity(l) - s->kept()).zero_();  // new tokens are visible
      }
      lengths_[at(l)] = s->kept();
      if (on_compacted) on_compacted(l, *s);
    }
    since_compression_ = 0;
  }

  /// Compresses if the schedule says so (after every append, or once per `slack` tokens).
  bool maybe_compress(const Compressor& compressor, const Schedule& schedule,
                      const OnCompacted& on_compacted = nullptr, const RecentQueries* queries = nullptr) {
    if (!schedule.due(since_compression_)) return false;
    compress(compressor, on_compacted, queries);
    return true;
  }

  /// Every row takes what row 0 of `one_row` holds -- its valid keys, values, positions,
  /// accumulated attention and hidden slots, its lengths and its count since the last
  /// compression: after one row was fed a prompt that every row shares (often in a cache over
  /// views of this cache's row 0, StaticDecoder::prefill_shared), the others hold it too, at
  /// the cost of copies instead of model calls. `one_row` has batch 1 and this cache's layers,
  /// heads, head_dim, dtype and device, and fits in its capacities.
  void copy_to_every_row(const StaticCache& one_row) {
    const std::string who = "StaticCache::copy_to_every_row: ";
    if (one_row.batch_ != 1 || one_row.num_layers() != num_layers() || one_row.heads_ != heads_ ||
        one_row.head_dim_ != head_dim_ || one_row.keys_[0].scalar_type() != keys_[0].scalar_type() ||
        one_row.keys_[0].device() != keys_[0].device())
      throw Error(who + "the source must be one row of " + std::to_string(num_layers()) + " layers, " +
                  std::to_string(heads_) + " heads of " + std::to_string(head_dim_) + " like this cache; got batch " +
                  std::to_string(one_row.batch_) + ", " + std::to_string(one_row.num_layers()) + " layers, " +
                  std::to_string(one_row.heads_) + " heads of " + std::to_string(one_row.head_dim_));
    for (int64_t l = 0; l < num_layers(); ++l)
      if (one_row.length(l) > capacity(l))
        throw Error(who + "layer " + std::to_string(l) + " of the source holds " + std::to_string(one_row.length(l)) +
                    " tokens, more than this cache's capacity " + std::to_string(capacity(l)));
    if (one_row.tracks_attention()) track_attention();
    if (one_row.tracks_hidden()) track_hidden();
    // A source that is a view of row 0 is read before any row is written.
    auto broadcast = [](const at::Tensor& dst, const at::Tensor& src, int64_t len) {
      const at::Tensor from = src.narrow(2, 0, len);
      const at::Tensor to = dst.narrow(2, 0, len);
      to.copy_((from.is_alias_of(dst) ? from.clone() : from).expand(to.sizes()));
    };
    for (int64_t l = 0; l < num_layers(); ++l) {
      const size_t i = at(l);
      const int64_t len = one_row.length(l);
      broadcast(keys_[i], one_row.keys_[i], len);
      broadcast(values_[i], one_row.values_[i], len);
      one_row.write_pending_positions(l);
      broadcast(positions_[i], one_row.positions_[i], len);
      pending_[i] = Pending{};
      if (one_row.tracks_attention()) broadcast(attention_[i], one_row.attention_[i], len);
      if (one_row.tracks_hidden()) broadcast(slot_bias_[i], one_row.slot_bias_[i], len);
      lengths_[i] = len;
    }
    since_compression_ = one_row.since_compression_;
    uncompressed_ = one_row.uncompressed_;
    uncompressed_by_ = one_row.uncompressed_by_;
  }

  /// Empties every layer (buffers are kept).
  void clear() {
    std::fill(lengths_.begin(), lengths_.end(), 0);
    for (auto& p : pending_) p.count = 0;
    for (auto& a : attention_) a.zero_();
    for (auto& b : slot_bias_) b.zero_();
    since_compression_ = 0;
  }

 private:
  // Positions per slot, scratch space and the valid lengths, for the key buffers in place.
  void allocate_bookkeeping() {
    const auto pos_options = keys_[0].options().dtype(at::kLong);
    int64_t max_cap = 0;
    for (const auto& k : keys_) {
      max_cap = std::max(max_cap, k.size(2));
      positions_.push_back(at::zeros({batch_, heads_, k.size(2)}, pos_options));
    }
    scratch_ = at::empty({batch_, heads_, max_cap, head_dim_}, keys_[0].options());
    pos_scratch_ = at::empty({batch_, heads_, max_cap}, pos_options);
    lengths_.assign(keys_.size(), 0);
    pending_.assign(keys_.size(), Pending{});
  }

  size_t at(int64_t layer) const {
    if (layer < 0 || layer >= num_layers())
      throw Error("StaticCache: layer " + std::to_string(layer) + " out of range [0, " +
                  std::to_string(num_layers()) + ")");
    return static_cast<size_t>(layer);
  }

  // Token counts and positions a step may record: t >= 0 tokens at positions >= 0 that fit in
  // int64 (first + t - 1 is the last one).
  static void check_positions(const char* who, int64_t t, int64_t first) {
    if (t < 0) throw Error(std::string(who) + ": token count must be >= 0, got " + std::to_string(t));
    if (first < 0 || first > std::numeric_limits<int64_t>::max() - t)
      throw Error(std::string(who) + ": first position must be in [0, " +
                  std::to_string(std::numeric_limits<int64_t>::max() - t) + "] for " + std::to_string(t) +
                  " tokens, got " + std::to_string(first));
  }

  // batch * heads * capacity * head_dim elements must be countable.
  static void check_elements(int64_t b, int64_t h, int64_t c, int64_t d) {
    const int64_t max = std::numeric_limits<int64_t>::max();
    if (c > max / b / h / d)
      throw Error("StaticCache: capacity " + std::to_string(c) + " with batch " + std::to_string(b) + ", heads " +
                  std::to_string(h) + " and head_dim " + std::to_string(d) + " is more elements than int64 counts");
  }

  void require_room_in(int64_t layer, int64_t t) const {
    if (t <= capacity(layer) - lengths_[at(layer)]) return;
    const bool skipped = std::find(uncompressed_.begin(), uncompressed_.end(), layer) != uncompressed_.end();
    throw Error("StaticCache: layer " + std::to_string(layer) + " is full: " +
                std::to_string(lengths_[at(layer)]) + " + " + std::to_string(t) +
                " tokens exceed its capacity " + std::to_string(capacity(layer)) +
                (skipped ? " -- the layer is in skip_layers " + params::format_int_list(uncompressed_) + " of " +
                               uncompressed_by_ + ", so it keeps every token: give it capacity for the whole "
                               "sequence or remove it from skip_layers"
                         : " (compress more often or allocate more)"));
  }

  // Positions first .. first + t - 1 for every (row, head): [batch, heads, t].
  at::Tensor position_block(int64_t first, int64_t t) const {
    return at::arange(first, first + t, positions_[0].options()).expand({batch_, heads_, t});
  }

  // Marks t tokens with positions first .. first + t - 1 as written after the valid slots of
  // `layer`. The positions reach the device only when needed (compression, positions()): a
  // decode step would otherwise cost one small copy kernel per layer, which on a GPU is a
  // measurable share of a step (docs/PERFORMANCE.md). Consecutive steps extend one pending run.
  void record(int64_t layer, int64_t first, int64_t t) {
    Pending& p = pending_[at(layer)];
    if (p.count > 0 && p.first + p.count != first) write_pending_positions(layer);
    if (p.count == 0) {
      p.slot = lengths_[at(layer)];
      p.first = first;
    }
    p.count += t;
    lengths_[at(layer)] += t;
    if (layer == 0) since_compression_ += t;
  }

  void write_pending_positions(int64_t layer) const {
    Pending& p = pending_[at(layer)];
    if (p.count == 0) return;
    positions_[at(layer)].narrow(2, p.slot, p.count).copy_(position_block(p.first, p.count));
    p.count = 0;
  }

  // Spans in increasing, non-overlapping order (what every built-in span policy returns).
  static bool ascending(const Selection& s) {
    int64_t end = 0;
    for (const auto& p : s.parts()) {
      if (p.start < end) return false;
      end = p.start + p.length;
    }
    return true;
  }

  // Moves the kept slots to the front of the buffer without allocating cache-sized memory:
  // ascending spans as below; any other selection is gathered into scratch and copied back (a
  // gather in place could read slots it has already overwritten).
  static void compact(const at::Tensor& buffer, int64_t len, const Selection& s, const at::Tensor& scratch) {
    const at::Tensor valid = buffer.narrow(2, 0, len);
    if (s.spans_only() && ascending(s)) {
      // Each span moves down to its offset; sources of later spans lie past every destination
      // so far. A span already in place (attention sinks) costs nothing, one that does not
      // overlap its destination one copy; only an overlapping move goes through scratch.
      int64_t offset = 0;
      for (const auto& p : s.parts()) {
        if (p.start != offset) {
          const at::Tensor src = valid.narrow(2, p.start, p.length);
          if (p.start >= offset + p.length) {
            buffer.narrow(2, offset, p.length).copy_(src);
          } else {
            at::Tensor tmp = scratch.narrow(2, 0, p.length);
            tmp.copy_(src);
            buffer.narrow(2, offset, p.length).copy_(tmp);
          }
        }
        offset += p.length;
      }
      return;
    }
    const int64_t k = s.kept();
    at::Tensor out = scratch.narrow(2, 0, k);
    const at::Tensor idx = s.positions(buffer.size(0), buffer.size(1), buffer.device()).unsqueeze(-1);
    at::gather_out(out, valid, 2, idx.expand({buffer.size(0), buffer.size(1), k, buffer.size(3)}));
    buffer.narrow(2, 0, k).copy_(out);
  }

  // Slots slot .. slot + count - 1 hold positions first .. first + count - 1, not yet written.
  struct Pending {
    int64_t slot = 0, first = 0, count = 0;
  };

  int64_t batch_ = 0, heads_ = 0, head_dim_ = 0;
  std::vector<at::Tensor> keys_, values_, positions_;
  mutable std::vector<Pending> pending_;
  std::vector<int64_t> lengths_;
  std::vector<at::Tensor> attention_;  // empty unless track_attention()
  std::vector<at::Tensor> slot_bias_;  // empty unless track_hidden()
  std::vector<at::Tensor> given_bias_;  // caller-owned masks for track_hidden() (Storage)
  at::Tensor scratch_, pos_scratch_, att_scratch_, bias_scratch_;
  int64_t since_compression_ = 0;
  // The last compressor's skip_layers and spec, so that a full layer's error can say why.
  std::vector<int64_t> uncompressed_;
  std::string uncompressed_by_;
};

}  // namespace kvcompress
