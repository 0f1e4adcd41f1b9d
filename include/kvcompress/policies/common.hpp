#pragma once
// What every policy file needs, and the seed's integer conversions.
#include <kvcompress/params.hpp>
#include <kvcompress/scoring.hpp>
#include <kvcompress/selection.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace kvcompress {
namespace detail {

// A double already rounded to an integer, as int64, saturating (a cast out of range is
// undefined behaviour). Sizes are compared with lengths, so saturating keeps "everything".
inline int64_t saturate_to_int64(double x) {
  constexpr double limit = 9223372036854775808.0;  // 2^63
  if (std::isnan(x)) return 0;
  if (x >= limit) return std::numeric_limits<int64_t>::max();
  if (x < -limit) return std::numeric_limits<int64_t>::min();
  return static_cast<int64_t>(x);
}
/// Python's int(x) for a double: truncation toward zero (saturating past int64).
inline int64_t py_int(double x) { return saturate_to_int64(std::trunc(x)); }
/// Python's math.ceil of the double-precision value (ceil(0.7 * 10) is 8), saturating.
inline int64_t py_ceil(double x) { return saturate_to_int64(std::ceil(x)); }

/// a + b for sizes >= 0, saturating at the largest int64: "seq <= a + b" keeps meaning "within
/// budget" for any representable budget instead of overflowing.
inline int64_t budget_sum(int64_t a, int64_t b) {
  return a > std::numeric_limits<int64_t>::max() - b ? std::numeric_limits<int64_t>::max() : a + b;
}
inline int64_t budget_sum(int64_t a, int64_t b, int64_t c) { return budget_sum(budget_sum(a, b), c); }

/// The "sinks + smallest-norm middle + recent window" rule shared by h2o_l2, pyramid_kv and
/// adaptive_l2: first `start`, then the `min(middle_keep, middle length)` smallest-norm tokens
/// of [start, seq - recent), then the last `recent`. With an empty middle: first `start` and
/// the last `fallback_recent` tokens.
inline Selection sinks_middle_recent(const at::Tensor& keys, int64_t start, int64_t middle_keep,
                                     int64_t recent, int64_t fallback_recent) {
  const int64_t seq = keys.size(2);
  const int64_t middle_end = seq - recent;
  Selection s;
  if (middle_end <= start) {
    s.keep_span(0, start).keep_span(seq - fallback_recent, fallback_recent);
    return s;
  }
  const int64_t middle_len = middle_end - start;
  s.keep_span(0, start);
  s.keep_indices(smallest_norm_positions(keys, start, middle_len, std::min(middle_keep, middle_len)));
  s.keep_span(middle_end, recent);
  return s;
}

/// The SnapKV layout shared by snapkv and snapkv_lite: the last `window` tokens are kept, and
/// the `keep_size - window` best-scored tokens of the prefix before them (`scores(prefix)` gives
/// [batch, heads, prefix], larger = better). Unchanged within budget.
template <class Scores>
std::optional<Selection> prefix_top_plus_window(int64_t seq, int64_t window, int64_t keep_size, Scores&& scores) {
  if (seq <= keep_size) return std::nullopt;
  const int64_t prefix = seq - window;
  if (prefix <= 0) return std::nullopt;
  const int64_t m = std::min(keep_size - window, prefix);
  Selection s;
  if (m > 0) s.keep_indices(top_k_positions(scores(prefix), m, 0, /*largest=*/true));
  return s.keep_span(prefix, window);
}

/// prefix_top_plus_window's choice as scores (HeadScores): the prefix's scores, +inf for the
/// window; std::nullopt where it keeps the layer unchanged.
template <class Scores>
std::optional<HeadScores> prefix_scores_plus_window(int64_t seq, int64_t window, int64_t keep_size,
                                                    Scores&& scores) {
  if (seq <= keep_size) return std::nullopt;
  const int64_t prefix = seq - window;
  if (prefix <= 0) return std::nullopt;
  const at::Tensor s = scores(prefix);
  const at::Tensor forced =
      at::full({s.size(0), s.size(1), window}, std::numeric_limits<double>::infinity(), s.options());
  return HeadScores{at::cat({s, forced}, 2), std::max<int64_t>(0, std::min(keep_size - window, prefix)) + window};
}

}  // namespace detail
}  // namespace kvcompress
