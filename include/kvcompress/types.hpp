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

/// What a policy sees of one layer when it decides which tokens to keep.
struct LayerView {
  const at::Tensor& keys;  ///< [batch, heads, seq, head_dim]; the policy must not modify it
  int64_t layer;           ///< index of this layer in the cache
  int64_t num_layers;      ///< number of layers in the cache (pyramid_kv's L)
  int64_t seq() const { return keys.size(2); }
};

}  // namespace kvcompress
