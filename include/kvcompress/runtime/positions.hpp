#pragma once
// Position rules: which rotary position each layer's new queries and keys get, and how cached
// keys move when compression moves them. GPT-NeoX specific: keys are cached already rotated
// (RoPE); moving a cached key from rotation position p to p' is one more rotation by p' - p,
// because rotations compose. GPT-NeoX rotates the first `rotary_ndims` dims of each head,
// pairing dim j with j + rotary_ndims / 2 ("rotate_half"), with angles p * base^(-2j /
// rotary_ndims). See docs/MODEL_CONTRACT.md and docs/ALGORITHMS.md.
#include <kvcompress/selection.hpp>
#include <kvcompress/types.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

/// How positions are assigned.
enum class PositionRule {
  /// Every token keeps its absolute index in the text; cached keys keep the rotation they got
  /// (the course project's runs).
  original,
  /// StreamingLLM: positions count cache slots, per layer. Layer l's new token is rotated at
  /// that layer's slot count; after a compression, the key in slot j is re-rotated to j. So
  /// every cached key of every layer sits at rotation == its slot, whatever was evicted, and
  /// no position ever exceeds the layer's length.
  cache,
};

inline const char* to_string(PositionRule rule) { return rule == PositionRule::cache ? "cache" : "original"; }

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

/// rerotate_keys with one delta for every key: the rotation factors are computed once on the
/// host (double, rounded to float32) instead of per key on the device, which saves most of the
/// kernels of a re-rotation (what a span move under the cache rule needs).
inline void rerotate_keys(at::Tensor keys, int64_t delta, int64_t rotary_ndims, double base) {
  if (keys.dim() != 4) throw Error("rerotate_keys: keys must be [batch, heads, n, head_dim]");
  if (rotary_ndims <= 0 || delta == 0 || keys.size(2) == 0) return;
  if (rotary_ndims % 2 != 0 || rotary_ndims > keys.size(3))
    throw Error("rerotate_keys: rotary_ndims must be even and <= head_dim, got " + std::to_string(rotary_ndims));
  const int64_t half = rotary_ndims / 2;
  at::Tensor factors = at::empty({2, half}, at::TensorOptions().dtype(at::kFloat).pinned_memory(keys.is_cuda()));
  float* f = factors.data_ptr<float>();
  for (int64_t j = 0; j < half; ++j) {
    const double angle = static_cast<double>(delta) * std::pow(base, -2.0 * static_cast<double>(j) / static_cast<double>(rotary_ndims));
    f[j] = static_cast<float>(std::cos(angle));
    f[half + j] = static_cast<float>(std::sin(angle));
  }
  factors = factors.to(keys.device(), /*non_blocking=*/true);
  const at::Tensor cos = factors[0], sin = factors[1];
  at::Tensor rot = keys.narrow(3, 0, rotary_ndims);
  const at::Tensor x1 = rot.narrow(3, 0, half).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  const at::Tensor x2 = rot.narrow(3, half, half).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  rot.narrow(3, 0, half).copy_(x1 * cos - x2 * sin);
  rot.narrow(3, half, half).copy_(x2 * cos + x1 * sin);
}

/// The cache rule after a compaction: `kept_keys` ([batch, heads, k, head_dim], slot j holding
/// the token that was in slot s.positions()[..., j], rotated at that old slot) are re-rotated
/// in place to their new slots 0 .. k - 1.
inline void rotate_kept_keys_to_slots(at::Tensor kept_keys, const Selection& s, int64_t rotary_ndims, double base) {
  const int64_t b = kept_keys.size(0), h = kept_keys.size(1), k = kept_keys.size(2);
  if (s.kept() != k) throw Error("rotate_kept_keys_to_slots: the selection keeps " + std::to_string(s.kept()) +
                                 " tokens, the keys hold " + std::to_string(k));
  if (s.spans_only()) {  // each span moves as a block: one delta per span, none for the sinks
    int64_t offset = 0;
    for (const auto& p : s.parts()) {
      rerotate_keys(kept_keys.narrow(2, offset, p.length), offset - p.start, rotary_ndims, base);
      offset += p.length;
    }
    return;
  }
  const at::Tensor old_slots = s.positions(b, h, kept_keys.device());
  const at::Tensor new_slots = at::arange(k, old_slots.options()).expand({b, h, k});
  rerotate_keys(kept_keys, new_slots - old_slots, rotary_ndims, base);
}

/// What to do when a version-1 model (one position per token for all layers) meets the cache
/// rule with layers of different lengths; the runtime and kvbench's up-front check say the same.
inline constexpr const char* kVersion1CacheRuleRemedy =
    "re-export it (examples/python/upgrade_contract.py), compress every layer alike (--skip-layers '', no "
    "pyramid_kv), or use positions 'original'";

/// The position ids of the next `t` tokens of every row, `fed` tokens having been fed so far
/// and layer l holding lengths[l] tokens:
///  - original rule: fed .. fed + t - 1, as [batch, t];
///  - cache rule, per_layer (contract version 2): layer l at lengths[l] .. lengths[l] + t - 1,
///    as [num_layers, batch, t];
///  - cache rule, one position for all layers (version 1): only while every layer holds the
///    same number of tokens; otherwise an error naming what to change.
inline at::Tensor next_positions(PositionRule rule, int64_t fed, const std::vector<int64_t>& lengths,
                                 int64_t batch, int64_t t, bool per_layer, at::Device device) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  if (rule == PositionRule::original) {
    if (t == 1) return at::full({batch, 1}, fed, opts);
    return at::arange(fed, fed + t, opts).expand({batch, t});
  }
  if (!per_layer) {
    for (size_t l = 1; l < lengths.size(); ++l)
      if (lengths[l] != lengths[0])
        throw Error("positions 'cache': layer " + std::to_string(l) + " holds " + std::to_string(lengths[l]) +
                    " tokens and layer 0 " + std::to_string(lengths[0]) +
                    ", but this model file (contract version 1) takes one position per token for all layers; " +
                    kVersion1CacheRuleRemedy);
    return next_positions(PositionRule::original, lengths.empty() ? 0 : lengths[0], {}, batch, t, false, device);
  }
  const int64_t n = static_cast<int64_t>(lengths.size());
  const at::Tensor first = at::tensor(lengths, at::kLong).view({n, 1, 1});
  return (first + at::arange(t, at::kLong).view({1, 1, t})).expand({n, batch, t}).contiguous().to(device);
}

}  // namespace runtime
}  // namespace kvcompress
