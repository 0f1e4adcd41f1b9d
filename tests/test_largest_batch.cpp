// kvbench --largest-batch's search (examples/kvbench/largest_batch.hpp) on synthetic memory:
// whatever the peaks look like, it ends on a batch that fits beside the next one that does not,
// measures no batch twice, and needs few measurements when the peaks follow a line.
#include "largest_batch.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <set>
#include <vector>

namespace {

struct Point {
  int64_t batch = 0;
  bool fits = false;
  int64_t peak_bytes = -1;
};

// A device of `limit` bytes on which batch b peaks at peak(b); a batch fits when its peak does.
struct Device {
  int64_t limit;
  std::function<int64_t(int64_t)> peak;
  std::set<int64_t> measured;
  int calls = 0;
  Point measure(int64_t b) {
    EXPECT_TRUE(measured.insert(b).second) << "batch " << b << " measured twice";
    EXPECT_GE(b, 1);
    ++calls;
    const int64_t p = peak(b);
    return {b, p <= limit, p};
  }
};

int64_t search(Device& d, const std::vector<int64_t>& listed, int64_t cap = int64_t{1} << 16) {
  std::vector<Point> points;
  for (int64_t b : listed) points.push_back(d.measure(b));
  return kvbench::find_largest_batch(points, d.limit, cap, [&](int64_t b) { return d.measure(b); });
}

// The answer by counting up: the first batch that does not fit, less one.
int64_t first_failure_less_one(const Device& d) {
  int64_t b = 1;
  while (d.peak(b) <= d.limit) ++b;
  return b - 1;
}

TEST(LargestBatch, LinearPeaksTakeAFewMeasurements) {
  for (int64_t per_row : {600, 1000, 123457, 11666667}) {  // answers from 58333 down to 3
    Device d{40'000'000, [per_row](int64_t b) { return 5'000'000 + per_row * b; }, {}, 0};
    const int64_t want = first_failure_less_one(d);
    EXPECT_EQ(search(d, {1, 2}), want) << per_row;
    EXPECT_LE(d.calls, 2 + 3) << "a line through two peaks predicts the answer; one more measurement confirms it";
  }
}

TEST(LargestBatch, PeaksOffTheLineStillEndOnTheBoundary) {
  // Fragmentation-like steps, a quadratic term and noise: the guess is wrong, bisection is not.
  const std::vector<std::function<int64_t(int64_t)>> peaks = {
      [](int64_t b) { return 1'000'000 + 50'000 * b + (b / 16) * 400'000; },
      [](int64_t b) { return 2'000'000 + 1'000 * b * b; },
      [](int64_t b) { return 3'000'000 + 90'000 * b + ((b * 7919) % 13) * 20'000; },
  };
  for (size_t i = 0; i < peaks.size(); ++i) {
    Device d{12'000'000, peaks[i], {}, 0};
    const int64_t got = search(d, {1, 2, 4});
    ASSERT_GE(got, 1) << i;
    EXPECT_LE(d.peak(got), d.limit) << i;
    EXPECT_GT(d.peak(got + 1), d.limit) << i;
    EXPECT_TRUE(d.measured.count(got) && d.measured.count(got + 1)) << i << ": the answer and the next are measured";
    EXPECT_LE(d.calls, 3 + 40) << i;
  }
}

TEST(LargestBatch, ListedBatchesThatDoNotFitBracketTheSearch) {
  Device d{1000, [](int64_t b) { return 100 * b; }, {}, 0};
  EXPECT_EQ(search(d, {1, 64}), 10);
  EXPECT_FALSE(d.measured.count(64) == 0);
  for (int64_t b : d.measured) EXPECT_LE(b, 64);
}

TEST(LargestBatch, NothingFitsOrEverythingFits) {
  Device none{10, [](int64_t b) { return 100 * b; }, {}, 0};
  EXPECT_EQ(search(none, {4}), 0);
  EXPECT_TRUE(none.measured.count(1)) << "batch 1 is tried before saying nothing fits";
  Device all{1, [](int64_t) { return 0; }, {}, 0};
  const int64_t got = search(all, {1}, 1024);
  EXPECT_EQ(got, 1024) << "the search stops at its cap";
  EXPECT_LE(all.calls, 12);
  Device no_peaks{1'000'000, [](int64_t b) { return b <= 37 ? -1 : 2'000'000; }, {}, 0};  // peaks unknown
  std::vector<Point> points{{1, true, -1}, {2, true, -1}};
  EXPECT_EQ(kvbench::find_largest_batch(points, no_peaks.limit, 1 << 16,
                                        [&](int64_t b) { return Point{b, b <= 37, -1}; }),
            37);
}

TEST(LargestBatch, AGuessFromTinyRowsStaysInRange) {
  // One byte per row against a limit of 2^62: the guess is clamped, never past int64.
  Device d{int64_t{1} << 62, [](int64_t b) { return 1000 + b; }, {}, 0};
  EXPECT_EQ(search(d, {1, 2}, 4096), 4096);
}

}  // namespace
