#pragma once
// The largest batch that fits in memory, found with few measurements (kvbench --throughput
// --largest-batch). A Point is any measurement with `batch`, `fits` and `peak_bytes` (-1 when
// unknown); measuring one costs a whole generation, so the search guesses from the peaks before
// it bisects.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvbench {

/// The largest batch whose peak a line through the two largest fitting batches' peaks (a fixed
/// part plus the same bytes per row) keeps under `limit`; 0 when they cannot say.
template <class Point>
int64_t predicted_largest_batch(const std::vector<Point>& fitting, int64_t limit) {
  if (fitting.size() < 2 || limit <= 0) return 0;
  const Point& a = fitting[fitting.size() - 2];
  const Point& b = fitting.back();
  if (a.peak_bytes < 0 || b.peak_bytes <= a.peak_bytes || b.batch <= a.batch) return 0;
  const double per_row = static_cast<double>(b.peak_bytes - a.peak_bytes) / static_cast<double>(b.batch - a.batch);
  // Clamped before the conversion: a row of a few bytes would put it past int64.
  const double room = std::clamp(std::floor(static_cast<double>(limit - b.peak_bytes) / per_row),
                                 -static_cast<double>(b.batch), 1e12);
  return b.batch + static_cast<int64_t>(room);
}

/// The largest batch that fits, from the points measured so far for one (run, context) and new
/// ones, `measure(batch)`, appended to `points`. Upwards it guesses from the peaks
/// (predicted_largest_batch), else doubles; between a batch that fits and one that does not it
/// tries the guess once, then halves the gap. Ends with a batch that fits and the next one that
/// does not; returns 0 when batch 1 does not fit, and stops at the first fitting batch of `cap`
/// or more.
template <class Point, class Measure>
int64_t find_largest_batch(std::vector<Point>& points, int64_t limit, int64_t cap, Measure&& measure) {
  bool guessed_inside = false, guess_reliable = true;
  for (;;) {
    int64_t hi = std::numeric_limits<int64_t>::max();  // the smallest batch that does not fit
    for (const auto& p : points)
      if (!p.fits) hi = std::min(hi, p.batch);
    std::vector<Point> fitting;  // below hi, by batch
    for (const auto& p : points)
      if (p.fits && p.batch < hi) fitting.push_back(p);
    std::sort(fitting.begin(), fitting.end(), [](const auto& x, const auto& y) { return x.batch < y.batch; });
    const int64_t lo = fitting.empty() ? 0 : fitting.back().batch;
    if (hi == lo + 1) return lo;
    if (lo >= cap) return lo;
    const int64_t guess = guess_reliable ? predicted_largest_batch(fitting, limit) : 0;
    int64_t next;
    if (lo == 0) {
      next = 1;
    } else if (hi == std::numeric_limits<int64_t>::max()) {
      // A guess at or below a batch that fits is checked one above; if that fits too, the
      // peaks do not follow a line (or the limit is far): double from then on.
      if (guess > lo) {
        next = guess;
      } else if (guess > 0) {
        next = lo + 1;
        guess_reliable = false;
      } else {
        next = 2 * lo;
      }
      next = std::min(next, cap);
    } else if (!guessed_inside && guess > lo && guess < hi) {
      next = guess;
      guessed_inside = true;
    } else {
      next = lo + (hi - lo) / 2;
    }
    points.push_back(measure(next));
  }
}

}  // namespace kvbench
