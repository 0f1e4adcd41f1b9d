#pragma once
// What a policy returns: which tokens of one layer survive, in the order they are kept.
#include <kvcompress/types.hpp>

#include <vector>

namespace kvcompress {

/// An ordered list of parts, each either a contiguous span of positions shared by every
/// (batch row, head) -- sinks, a recent window -- or a per-(row, head) index tensor
/// [batch, heads, k] of int64 positions, ascending, chosen by scores. Every (row, head) keeps
/// the same count; a per-head budget hides some of them from attention (`hide`). Policies build
/// selections; `apply_selection` (apply.hpp) moves the memory.
class Selection {
 public:
  struct Part {
    int64_t start = 0;    ///< span: first position
    int64_t length = 0;   ///< span: number of positions; for indices: k
    at::Tensor indices;   ///< defined for an index part: [batch, heads, k] int64
    bool is_span() const { return !indices.defined(); }
  };

  /// Keeps positions [start, start + length); an empty span is dropped.
  Selection& keep_span(int64_t start, int64_t length) {
    if (length > 0) parts_.push_back(Part{start, length, at::Tensor()});
    return *this;
  }
  /// Keeps the positions in `indices` ([batch, heads, k], int64, ascending per row and head).
  Selection& keep_indices(at::Tensor indices) {
    const int64_t k = indices.size(-1);
    if (k > 0) parts_.push_back(Part{0, k, std::move(indices)});
    return *this;
  }

  const std::vector<Part>& parts() const { return parts_; }

  /// Marks kept slots as hidden: `mask` bool [batch, heads, kept()] in selection order, true =
  /// the token stays in memory (every head keeps the same count) but is evicted from that head's
  /// attention. How a per-head budget (policies/adakv.hpp) gives heads different counts in a
  /// dense cache; only a cache that keeps the mask can apply such a selection.
  Selection& hide(at::Tensor mask) {
    hidden_ = std::move(mask);
    return *this;
  }
  /// The hidden mask, or an undefined tensor when every kept slot is visible.
  const at::Tensor& hidden() const { return hidden_; }

  /// Tokens kept per (row, head).
  int64_t kept() const {
    int64_t n = 0;
    for (const auto& p : parts_) n += p.length;
    return n;
  }

  /// True when no part depends on the row or head: the kept tokens are the same everywhere,
  /// so the memory can be moved with slices instead of a gather.
  bool spans_only() const {
    for (const auto& p : parts_)
      if (!p.is_span()) return false;
    return true;
  }

  /// The kept original positions as one [batch, heads, kept] int64 tensor on `device`.
  at::Tensor positions(int64_t batch, int64_t heads, at::Device device) const {
    std::vector<at::Tensor> pieces;
    pieces.reserve(parts_.size());
    for (const auto& p : parts_) {
      if (p.is_span()) {
        pieces.push_back(at::arange(p.start, p.start + p.length,
                                    at::TensorOptions().dtype(at::kLong).device(device))
                             .expand({batch, heads, p.length}));
      } else {
        pieces.push_back(p.indices);
      }
    }
    if (pieces.empty())
      return at::empty({batch, heads, 0}, at::TensorOptions().dtype(at::kLong).device(device));
    return pieces.size() == 1 ? pieces.front().contiguous() : at::cat(pieces, 2);
  }

 private:
  std::vector<Part> parts_;
  at::Tensor hidden_;
};

}  // namespace kvcompress
