#pragma once
// Position rules. Keys are cached already rotated (RoPE); moving a cached key from rotation
// position p to p' is one more rotation by p' - p, because rotations compose. GPT-NeoX rotates
// the first `rotary_ndims` dims of each head, pairing dim j with j + rotary_ndims / 2
// ("rotate_half"), with angles p * base^(-2j / rotary_ndims). See docs/MODEL_CONTRACT.md.
#include <kvcompress/apply.hpp>
#include <kvcompress/compressor.hpp>

namespace kvcompress {

/// How positions are assigned when a cache is compressed.
enum class PositionRule {
  original,  ///< every token keeps its absolute index; kept keys stay as rotated (the seed's runs)
  cache,     ///< distances are counted in cache slots (StreamingLLM): kept keys are re-rotated
};

/// Rotates `keys` ([batch, heads, n, head_dim]) by `delta` ([batch, heads, n] int64 positions),
/// in place, in float32 whatever the cache dtype. Dims past rotary_ndims are untouched.
inline void rerotate_keys(at::Tensor keys, const at::Tensor& delta, int64_t rotary_ndims, double base) {
  if (keys.dim() != 4) throw Error("rerotate_keys: keys must be [batch, heads, n, head_dim]");
  if (delta.sizes() != keys.sizes().slice(0, 3))
    throw Error("rerotate_keys: delta must be [batch, heads, n]");
  if (rotary_ndims <= 0) return;
  if (rotary_ndims % 2 != 0 || rotary_ndims > keys.size(3))
    throw Error("rerotate_keys: rotary_ndims must be even and <= head_dim, got " + std::to_string(rotary_ndims));
  const int64_t half = rotary_ndims / 2;
  const auto f32 = keys.options().dtype(at::kFloat);
  const at::Tensor inv_freq = at::pow(base, at::arange(0, rotary_ndims, 2, f32) / static_cast<double>(rotary_ndims)).reciprocal();
  const at::Tensor angle = delta.to(at::kFloat).unsqueeze(-1) * inv_freq;  // [B, H, n, half]
  const at::Tensor cos = angle.cos(), sin = angle.sin();
  at::Tensor rot = keys.narrow(3, 0, rotary_ndims);
  // Copies (copy=true), so writing the first half cannot change x1 before the second is done.
  const at::Tensor x1 = rot.narrow(3, 0, half).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  const at::Tensor x2 = rot.narrow(3, half, half).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  // [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]: rotate_half applied with angle `delta`.
  rot.narrow(3, 0, half).copy_(x1 * cos - x2 * sin);
  rot.narrow(3, half, half).copy_(x2 * cos + x1 * sin);
}

/// compressor.compress(kv) under the `cache` rule. `rotation[l]` ([batch, heads, seq_l] int64)
/// holds the position each cached key of layer l is rotated at; it is updated with the cache.
/// Kept keys are re-rotated so that a query fed at `next_position` (the next token's absolute
/// index) sees each key at its distance in slots (StreamingLLM's positions): the key in slot j
/// of a layer left with k tokens is rotated at next_position - k + j. Uncompressed layers are
/// untouched (they already satisfy this).
inline KVCache compress_reassigning_positions(const Compressor& compressor, const KVCache& kv,
                                              std::vector<at::Tensor>& rotation, int64_t next_position,
                                              int64_t rotary_ndims, double base) {
  detail::validate_cache(kv, compressor.name());
  if (rotation.size() != kv.size()) throw Error("compress_reassigning_positions: one rotation tensor per layer");
  KVCache out;
  out.reserve(kv.size());
  const int64_t n = static_cast<int64_t>(kv.size());
  for (int64_t l = 0; l < n; ++l) {
    const auto& [keys, values] = kv[static_cast<size_t>(l)];
    std::optional<Selection> s = compressor.select(LayerView{keys, l, n});
    if (!s) {
      out.emplace_back(keys, values);
      continue;
    }
    LayerKV kept = apply_selection(keys, values, *s);
    const int64_t k = s->kept();
    at::Tensor& rot = rotation[static_cast<size_t>(l)];
    const at::Tensor old_rot = rot.gather(2, s->positions(keys.size(0), keys.size(1), rot.device()));
    const at::Tensor new_rot = at::arange(next_position - k, next_position, rot.options()).expand_as(old_rot).contiguous();
    rerotate_keys(kept.first, new_rot - old_rot, rotary_ndims, base);
    rot = new_rot;
    out.push_back(std::move(kept));
  }
  return out;
}

}  // namespace kvcompress
