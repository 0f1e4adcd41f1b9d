#pragma once
// The one mechanism that moves memory: a Selection applied to a layer's keys and values.
#include <kvcompress/selection.hpp>

namespace kvcompress {

/// Returns new tensors holding the selected tokens of `keys` and `values` in selection order.
/// Keys and values use the same positions; the result never aliases the inputs, so dropping the
/// old cache frees its memory. Spans-only selections are sliced; otherwise one gather is used.
inline LayerKV apply_selection(const at::Tensor& keys, const at::Tensor& values,
                               const Selection& selection) {
  const auto& parts = selection.parts();
  if (selection.spans_only()) {
    auto take = [&](const at::Tensor& x) {
      if (parts.empty()) return x.narrow(2, 0, 0).clone(at::MemoryFormat::Contiguous);
      if (parts.size() == 1)
        return x.narrow(2, parts[0].start, parts[0].length).clone(at::MemoryFormat::Contiguous);
      std::vector<at::Tensor> slices;
      slices.reserve(parts.size());
      for (const auto& p : parts) slices.push_back(x.narrow(2, p.start, p.length));
      return at::cat(slices, 2);
    };
    return {take(keys), take(values)};
  }
  const int64_t batch = keys.size(0), heads = keys.size(1), kept = selection.kept();
  const at::Tensor pos = selection.positions(batch, heads, keys.device()).unsqueeze(-1);
  return {keys.gather(2, pos.expand({batch, heads, kept, keys.size(3)})),
          values.gather(2, pos.expand({batch, heads, kept, values.size(3)}))};
}

/// The per-slot data `side` ([batch, heads, seq]: scores, positions) of the tokens `selection`
/// keeps, in selection order: what keeps such data with its tokens through a compression.
inline at::Tensor take_slots(const at::Tensor& side, const Selection& selection) {
  return side.gather(2, selection.positions(side.size(0), side.size(1), side.device()));
}

}  // namespace kvcompress
