#pragma once
// Per-head budgets in the spirit of Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache
// Eviction by Adaptive Budget Allocation"): a layer keeps heads * B tokens in all, chosen by the
// best scores over every head together, so a head whose attention is concentrated gives budget
// to one whose attention is spread. A safeguard keeps at least alpha_safeguard * B per head (the
// kvpress AdaKVPress rule). Wraps any policy that ranks slots (`head_scores`, scoring.hpp).
//
// A dense cache stores the same number of slots in every head, so a head that keeps fewer
// tokens fills its slots with its next-best tokens marked hidden (Selection::hide): they stay in
// memory, attention never reaches them, and they are never chosen again. `head_cap` bounds what
// one head may keep (a multiple of B), and with it the memory: every head holds
// min(seq, ceil(head_cap * B)) slots, B of them visible on average. Where ours departs from the
// paper: the paper's varlen cache holds exactly heads * B tokens and no head is capped; here the
// cap is the price of a dense layout (head_cap >= heads is the paper's unconstrained allocation,
// at the memory of the whole sequence).
#include <kvcompress/compressor.hpp>
#include <kvcompress/policies/common.hpp>
#include <kvcompress/policies/h2o.hpp>
#include <kvcompress/policies/snapkv.hpp>

#include <limits>

namespace kvcompress {

template <class BaseOptions>
struct AdaKVOptions {
  BaseOptions base;              ///< the scoring policy's own parameters (its budget is B)
  double alpha_safeguard = 0.2;  ///< every head keeps at least int(alpha * B) visible tokens
  double head_cap = 2.0;         ///< no head keeps more than ceil(head_cap * B); the slots per head
};

namespace detail {

// The per-head budget rule on `hs` (see the file comment); `hidden` = slots already evicted.
inline Selection per_head_budget(const HeadScores& hs, const at::Tensor& hidden, double alpha, double head_cap) {
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor s = hs.scores.clone();
  const int64_t b = s.size(0), h = s.size(1), seq = s.size(2), n = hs.per_head;
  if (hidden.defined()) s.masked_fill_(hidden, -inf);  // evicted once, evicted for good
  auto ranked = [](const at::Tensor& x) { return std::get<1>(x.sort(/*stable=*/true, -1, /*descending=*/true)); };
  // Safeguard: each head's int(alpha * n) best slots outrank every other head's.
  const int64_t floor = std::min(n, py_int(alpha * static_cast<double>(n)));
  if (floor > 0) {
    const at::Tensor top = ranked(s).narrow(-1, 0, floor);
    const at::Tensor v = s.gather(-1, top);
    const double big = s.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                      : static_cast<double>(std::numeric_limits<float>::max());
    s.scatter_(-1, top, at::where(v.gt(-inf), v.clamp_min(big), v));
  }
  // Cap: slots past a head's `slots` best can be neither kept nor chosen.
  const int64_t slots = std::min(seq, std::max(n, py_ceil(head_cap * static_cast<double>(n))));
  if (slots < seq) s.scatter_(-1, ranked(s).narrow(-1, slots, seq - slots), -inf);
  // The layer's h * n best slots over all heads (ties: the earlier head, then the earlier slot).
  const at::Tensor flat = s.reshape({b, h * seq});
  const at::Tensor best = ranked(flat).narrow(-1, 0, std::min(h * seq, h * n));
  at::Tensor chosen = at::zeros_like(flat, flat.options().dtype(at::kBool)).scatter_(1, best, true);
  chosen = chosen.logical_and_(flat.gt(-inf)).view({b, h, seq});
  // Every head stores `slots` slots: its chosen ones, then its best others, hidden.
  const at::Tensor positions = top_k_positions(s.masked_fill(chosen, inf), slots, 0, /*largest=*/true);
  Selection out;
  out.keep_indices(positions);
  return out.hide(chosen.gather(-1, positions).logical_not_());
}

}  // namespace detail

namespace policies {

/// Per-head budgets over `Base`, a policy with `head_scores(options, layer)`.
template <class Base>
struct AdaKV {
  using Options = AdaKVOptions<typename Base::Options>;

  template <class O, class V>
  static void visit_params(O& o, V& v) {
    Base::visit_params(o.base, v);
    v.real("alpha_safeguard", o.alpha_safeguard, 0.0, 1.0);
    v.real("head_cap", o.head_cap, 1.0, 1e6);
  }

  static std::vector<int64_t> default_skip_layers() { return ::kvcompress::default_skip_layers<Base>(); }

  static Needs needs(const Options& o) {
    Needs n = needs_of<Base>(o.base);
    n.hides = true;
    return n;
  }

  static std::optional<Selection> select(const Options& o, const LayerView& layer) {
    std::optional<HeadScores> hs = Base::head_scores(o.base, layer);
    if (!hs || hs->per_head >= layer.seq()) return std::nullopt;
    return detail::per_head_budget(*hs, layer.hidden, o.alpha_safeguard, o.head_cap);
  }
};

/// Ada-SnapKV: SnapKV's observation-window votes, budgets per head (the paper's main method).
struct AdaKVSnapKV : AdaKV<SnapKV> {
  static constexpr const char* name = "adakv_snapkv";
};

/// H2O's accumulated attention with budgets per head.
struct AdaKVH2O : AdaKV<H2O> {
  static constexpr const char* name = "adakv_h2o";
};

}  // namespace policies
}  // namespace kvcompress
