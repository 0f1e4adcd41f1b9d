#pragma once
// The vocabulary types shared by every part of kvcompress.
#include <ATen/ATen.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kvcompress {

/// One layer's cache: keys and values, each [batch, heads, seq, head_dim].
using LayerKV = std::pair<at::Tensor, at::Tensor>;

/// A whole model's cache, one entry per layer (the seed's Python list of (k, v) tuples).
/// `at::Tensor` is `torch::Tensor`: code that includes <torch/torch.h> can spell it either way.
using KVCache = std::vector<LayerKV>;

/// Every error kvcompress raises for bad input: unknown method or parameter, out-of-range value,
/// malformed spec, tensors of the wrong rank/shape/dtype/device. The message names the problem.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// What a policy sees of one layer when it decides which tokens to keep. Keys and the layer's
/// place are always there; the rest only when the policy asks for it (`Needs`, compressor.hpp)
/// and the caller -- the kvcompress runtime, StaticCache, or a user -- fills it in. Undefined
/// tensors mean "not provided"; the compressor refuses a policy whose needs are missing.
struct LayerView {
  const at::Tensor& keys;  ///< [batch, heads, seq, head_dim]; the policy must not modify it
  int64_t layer;           ///< index of this layer in the cache
  int64_t num_layers;      ///< number of layers in the cache (pyramid_kv's L)
  at::Tensor values = {};  ///< [batch, heads, seq, head_dim]
  /// Attention each cached slot has received, accumulated over the steps since it arrived
  /// with the policy's decay (score <- decay * score + this step's attention, summed over the
  /// step's queries): float32 [batch, heads, seq].
  at::Tensor attention = {};
  /// The last W queries of this layer (rotated as the model used them), oldest first:
  /// [batch, heads, W, head_dim]; W may be smaller than asked for early in a sequence.
  at::Tensor queries = {};
  at::Tensor query_positions = {};  ///< int64 [W]: original positions of those queries
  at::Tensor key_positions = {};    ///< int64 [batch, heads, seq]: original position of every slot
  /// bool [batch, heads, seq]: slots an earlier compression evicted from one head's budget but
  /// left in memory (per-head budgets, Selection::hide); attention never reaches them.
  at::Tensor hidden = {};
  int64_t seq() const { return keys.size(2); }
};

/// What a policy needs to see besides a layer's keys; the runtime provides it (LayerView).
struct Needs {
  bool values = false;
  /// Accumulated attention per cached slot, decayed by `decay` each step before the step's
  /// attention is added (1 = a plain sum, as H2O accumulates).
  bool attention = false;
  double decay = 1.0;
  /// The last `queries` queries of the layer, their positions and the slots' positions
  /// (SnapKV's observation window, TOVA's last query); 0 = none.
  int64_t queries = 0;
  /// The policy hides slots per head (Selection::hide): the caller keeps which slots are hidden,
  /// shows them to the policy (LayerView::hidden) and masks them out of attention.
  bool hides = false;
  bool scores() const { return attention || queries > 0; }
};

}  // namespace kvcompress
