#pragma once
// Input checks shared by every entry point: a bad cache is reported, never half-processed.
#include <kvcompress/types.hpp>

#include <sstream>

namespace kvcompress {
namespace detail {

inline std::string shape_text(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

/// Checks one layer: defined, rank 4, keys and values of one shape/dtype/device, floating point.
inline void validate_layer(const at::Tensor& keys, const at::Tensor& values, size_t i,
                           const std::string& who) {
  const std::string where = who + ": layer " + std::to_string(i) + ": ";
  if (!keys.defined() || !values.defined()) throw Error(where + "keys or values tensor is undefined");
  if (keys.dim() != 4)
    throw Error(where + "keys must have rank 4 [batch, heads, seq, head_dim], got shape " + shape_text(keys));
  if (keys.sizes() != values.sizes())
    throw Error(where + "keys and values must have the same shape, got keys " + shape_text(keys) +
                " and values " + shape_text(values));
  if (!is_supported_dtype(keys.scalar_type()))
    throw Error(where + "keys must be float32, float16, bfloat16 or float64, got " +
                std::string(c10::toString(keys.scalar_type())));
  if (keys.scalar_type() != values.scalar_type())
    throw Error(where + "keys and values must have the same dtype, got " +
                std::string(c10::toString(keys.scalar_type())) + " and " +
                std::string(c10::toString(values.scalar_type())));
  if (keys.device() != values.device())
    throw Error(where + "keys and values must be on the same device, got " + keys.device().str() +
                " and " + values.device().str());
}

/// Checks every layer, and that all layers agree in batch, heads and device.
inline void validate_cache(const KVCache& kv, const std::string& who) {
  for (size_t i = 0; i < kv.size(); ++i) {
    validate_layer(kv[i].first, kv[i].second, i, who);
    if (i == 0) continue;
    const at::Tensor& a = kv[0].first;
    const at::Tensor& b = kv[i].first;
    if (a.size(0) != b.size(0) || a.size(1) != b.size(1))
      throw Error(who + ": layer " + std::to_string(i) + " has batch " + std::to_string(b.size(0)) +
                  " and heads " + std::to_string(b.size(1)) + " but layer 0 has batch " +
                  std::to_string(a.size(0)) + " and heads " + std::to_string(a.size(1)));
    if (a.device() != b.device())
      throw Error(who + ": layer " + std::to_string(i) + " is on " + b.device().str() +
                  " but layer 0 is on " + a.device().str());
  }
}

}  // namespace detail
}  // namespace kvcompress
