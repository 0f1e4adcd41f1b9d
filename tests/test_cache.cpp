// The fixed-capacity cache: compressing every step keeps exactly what the functional API keeps;
// the chunked schedule compacts correctly from any state; positions follow the kept tokens.
#include "test_support.hpp"

#include <kvcompress/runtime/positions.hpp>

using namespace kvtest;
namespace kvc = kvcompress;
namespace rt = kvcompress::runtime;

namespace {

// Budgets of 10-16 tokens; skip_layers=[0] so one layer stays whole. (fix_size_l2's random
// strategy draws from the RNG, so it is left out of exact comparisons.)
const std::vector<std::string> kSpecs = {
    "l2(keep_ratio=0.7, prune_after=12, skip_layers=[0])",
    "fix_size_l2(fix_kv_size=12, keep_ratio=0.5, skip_layers=[0])",
    "fix_size_l2(fix_kv_size=12, keep_ratio=0.25, strategy=keep_high, skip_layers=[0])",
    "streaming_llm(start_size=2, recent_size=10, skip_layers=[0])",
    "h2o_l2(start_size=2, heavy_hitter_size=4, recent_size=6, skip_layers=[0])",
    "snapkv_lite(observation_window=4, keep_size=12, pooling_kernel=3, skip_layers=[0])",
    "pyramid_kv(base_size=16, layer_decay=0.8, min_size=6, skip_layers=[0])",
    "adaptive_l2(target_size=12, soft_limit=8, hard_limit=14, skip_layers=[0])",
    "recent_only(window_size=11, skip_layers=[0])",
};

constexpr int64_t kLayers = 3, kBatch = 2, kHeads = 3, kDim = 4;

}  // namespace

class Cache : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cuda" && !at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  }
  at::TensorOptions opts() const { return at::TensorOptions().dtype(at::kFloat).device(device_named(GetParam())); }
  kvc::LayerKV tokens(int64_t t) const { return {at::randn({kBatch, kHeads, t, kDim}, opts()), at::randn({kBatch, kHeads, t, kDim}, opts())}; }
};

INSTANTIATE_TEST_SUITE_P(Devices, Cache, ::testing::Values("cpu", "cuda"));

TEST_P(Cache, EveryStepKeepsExactlyWhatTheFunctionalApiKeeps) {
  at::manual_seed(3);
  for (const auto& spec : kSpecs) {
    SCOPED_TRACE(spec);
    auto c = kvc::make_compressor(spec);
    kvc::StaticCache cache(kLayers, kBatch, kHeads, kDim, {64}, opts());
    kvc::KVCache reference(kLayers, {at::empty({kBatch, kHeads, 0, kDim}, opts()), at::empty({kBatch, kHeads, 0, kDim}, opts())});
    int64_t position = 0;
    for (int64_t step = 0; step < 40; ++step) {
      const int64_t t = step == 0 ? 9 : 1;  // a prefill chunk, then one token at a time
      for (int64_t l = 0; l < kLayers; ++l) {
        auto [k, v] = tokens(t);
        cache.append(l, k, v, position);
        reference[l] = {at::cat({reference[l].first, k}, 2), at::cat({reference[l].second, v}, 2)};
      }
      position += t;
      reference = c->compress(reference);
      cache.maybe_compress(*c, kvc::Schedule::every());
      const kvc::KVCache view = cache.view();
      for (int64_t l = 0; l < kLayers; ++l) {
        ASSERT_TRUE(at::equal(view[l].first, reference[l].first)) << "step " << step << " layer " << l;
        ASSERT_TRUE(at::equal(view[l].second, reference[l].second)) << "step " << step << " layer " << l;
      }
    }
    EXPECT_EQ(cache.length(0), 48);  // 9 + 39 tokens: the skipped layer kept everything
    EXPECT_LT(cache.length(1), 17);
  }
}

namespace {

// A user's policy (as in examples/example_policy_types.cpp): the first `head` tokens and every
// `stride`-th after them, as ascending spans.
struct Strided {
  struct Options {
    int64_t head = 3, stride = 3;
  };
  static constexpr const char* name = "test_strided";
  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("head", o.head, 0);
    v.integer("stride", o.stride, 1);
  }
  static std::optional<kvc::Selection> select(const Options& o, const kvc::LayerView& layer) {
    if (layer.seq() <= 12) return std::nullopt;
    kvc::Selection s;
    s.keep_span(0, o.head);
    for (int64_t t = layer.seq() - 1; t >= o.head && s.kept() < 12; t -= o.stride) s.keep_span(t, 1);
    return s;  // the strided part newest first: spans out of order
  }
};

// Another: the newest 6 tokens first, then the oldest 4 (two spans in decreasing order).
struct NewestThenOldest {
  struct Options {};
  static constexpr const char* name = "test_newest_then_oldest";
  template <class O, class V>
  static void visit_params(O&, V&) {}
  static std::optional<kvc::Selection> select(const Options&, const kvc::LayerView& layer) {
    if (layer.seq() <= 10) return std::nullopt;
    kvc::Selection s;
    s.keep_span(layer.seq() - 6, 6);
    s.keep_span(0, 4);
    return s;
  }
};

}  // namespace

TEST_P(Cache, HalfPrecisionAndUserPoliciesKeepExactlyWhatTheFunctionalApiKeeps) {
  // float16 and bfloat16 caches (README's example runs float16 on CUDA), every built-in policy
  // that scores keys and two user-written ones whose spans come out of order (the gather path
  // of the compaction): the cache after each step is bitwise the functional API's.
  std::vector<std::unique_ptr<kvc::Compressor>> compressors;
  for (const auto& spec : kSpecs) compressors.push_back(kvc::make_compressor(spec));
  compressors.push_back(std::make_unique<kvc::BasicCompressor<Strided>>(Strided::Options{}, std::vector<int64_t>{0}));
  compressors.push_back(std::make_unique<kvc::BasicCompressor<NewestThenOldest>>(NewestThenOldest::Options{},
                                                                                 std::vector<int64_t>{0}));
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    const auto o = opts().dtype(dtype);
    for (const auto& c : compressors) {
      SCOPED_TRACE(c->spec() + " " + std::string(c10::toString(dtype)));
      at::manual_seed(5);
      kvc::StaticCache cache(kLayers, kBatch, kHeads, kDim, {64}, o);
      kvc::KVCache reference(kLayers, {at::empty({kBatch, kHeads, 0, kDim}, o), at::empty({kBatch, kHeads, 0, kDim}, o)});
      int64_t position = 0;
      for (int64_t step = 0; step < 30; ++step) {
        const int64_t t = step == 0 ? 9 : 1;
        for (int64_t l = 0; l < kLayers; ++l) {
          const at::Tensor k = at::randn({kBatch, kHeads, t, kDim}, o), v = at::randn({kBatch, kHeads, t, kDim}, o);
          cache.append(l, k, v, position);
          reference[l] = {at::cat({reference[l].first, k}, 2), at::cat({reference[l].second, v}, 2)};
        }
        position += t;
        reference = c->compress(reference);
        cache.maybe_compress(*c, kvc::Schedule::every());
        const kvc::KVCache view = cache.view();
        for (int64_t l = 0; l < kLayers; ++l) {
          ASSERT_EQ(view[l].first.scalar_type(), dtype);
          ASSERT_TRUE(at::equal(view[l].first, reference[l].first)) << "step " << step << " layer " << l;
          ASSERT_TRUE(at::equal(view[l].second, reference[l].second)) << "step " << step << " layer " << l;
        }
      }
      EXPECT_EQ(cache.length(0), 38);  // the skipped layer
      EXPECT_LT(cache.length(2), 17);
    }
  }
  // The out-of-order policy really compressed, newest first: slot 0 holds the token 6 back.
  kvc::BasicCompressor<NewestThenOldest> c({}, {});
  kvc::StaticCache cache(1, 1, 1, kDim, {16}, opts());
  const at::Tensor k = at::arange(12 * kDim, opts()).view({1, 1, 12, kDim}), v = k + 1000;
  cache.append(0, k, v, 0);
  cache.compress(c);
  ASSERT_EQ(cache.length(0), 10);
  EXPECT_TRUE(at::equal(cache.view()[0].first.narrow(2, 0, 6), k.narrow(2, 6, 6)));
  EXPECT_TRUE(at::equal(cache.view()[0].first.narrow(2, 6, 4), k.narrow(2, 0, 4)));
  EXPECT_TRUE(at::equal(cache.view()[0].second.narrow(2, 6, 4), v.narrow(2, 0, 4)));
  EXPECT_TRUE(at::equal(cache.positions(0).view(-1), at::tensor({6, 7, 8, 9, 10, 11, 0, 1, 2, 3}, opts().dtype(at::kLong))));
}

TEST_P(Cache, ChunkedScheduleCompactsFromAnyState) {
  at::manual_seed(4);
  const int64_t slack = 5;
  for (const auto& spec : kSpecs) {
    SCOPED_TRACE(spec);
    auto c = kvc::make_compressor(spec);
    kvc::StaticCache cache(kLayers, kBatch, kHeads, kDim, {80}, opts());
    int compressions = 0;
    for (int64_t step = 0; step < 50; ++step) {
      for (int64_t l = 0; l < kLayers; ++l) {
        auto [k, v] = tokens(1);
        cache.append(l, k, v, step);
      }
      kvc::KVCache before;
      for (const auto& [k, v] : cache.view()) before.emplace_back(k.clone(), v.clone());
      if (!cache.maybe_compress(*c, kvc::Schedule::chunk(slack))) continue;
      ++compressions;
      const kvc::KVCache expected = c->compress(before);
      const kvc::KVCache view = cache.view();
      for (int64_t l = 0; l < kLayers; ++l) {
        ASSERT_TRUE(at::equal(view[l].first, expected[l].first)) << "step " << step << " layer " << l;
        ASSERT_TRUE(at::equal(view[l].second, expected[l].second)) << "step " << step << " layer " << l;
      }
    }
    EXPECT_EQ(compressions, 10);  // once per `slack` appended tokens
    EXPECT_LE(cache.length(1), 16 + slack);
  }
}

TEST_P(Cache, PositionsFollowTheKeptTokens) {
  auto c = kvc::make_compressor("streaming_llm(start_size=2, recent_size=3)");
  kvc::StaticCache cache(1, kBatch, kHeads, kDim, {16}, opts());
  for (int64_t step = 0; step < 9; ++step) {
    auto [k, v] = tokens(1);
    cache.append(0, k, v, 100 + step);
    cache.compress(*c);
  }
  const at::Tensor pos = cache.positions(0).to(at::kCPU);
  ASSERT_EQ(pos.sizes(), at::IntArrayRef({kBatch, kHeads, 5}));
  const std::vector<int64_t> expected = {100, 101, 106, 107, 108};
  for (int64_t b = 0; b < kBatch; ++b)
    for (int64_t h = 0; h < kHeads; ++h)
      for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(pos[b][h][i].item<int64_t>(), expected[static_cast<size_t>(i)]);
  // Per-head selections move positions per head: h2o keeps different middles per head.
  auto h2o = kvc::make_compressor("h2o_l2(start_size=1, heavy_hitter_size=1, recent_size=1)");
  kvc::StaticCache per_head(1, 1, 2, 4, {8}, opts());
  auto in = layer_from_norms({{{5, 1, 9, 9, 5}, {5, 9, 9, 1, 5}}}, 4, at::kFloat, device_named(GetParam()));
  per_head.append(0, in.first, in.second, 0);
  per_head.compress(*h2o);
  const at::Tensor p = per_head.positions(0).to(at::kCPU);
  EXPECT_EQ(p[0][0][1].item<int64_t>(), 1);
  EXPECT_EQ(p[0][1][1].item<int64_t>(), 3);
  expect_kept({per_head.view()[0].first, per_head.view()[0].second}, in, {{{0, 1, 4}, {0, 3, 4}}});
}

// Span compaction moves a span directly when it does not overlap its destination and through
// scratch when it does; lengths around the boundary (recent span [n-10, n) -> [2, 12) overlaps
// up to n = 21) must all keep exactly what the functional API keeps, positions included.
TEST_P(Cache, SpanCompactionAroundTheOverlapBoundary) {
  for (const std::string spec : {"streaming_llm(start_size=2, recent_size=10)", "recent_only(window_size=10)"}) {
    auto c = kvc::make_compressor(spec);
    for (int64_t n : {13, 21, 22, 23, 40}) {
      SCOPED_TRACE(spec + " n=" + std::to_string(n));
      kvc::StaticCache cache(1, kBatch, kHeads, kDim, {48}, opts());
      auto [k, v] = tokens(n);
      cache.append(0, k, v, 0);
      cache.compress(*c);
      const kvc::KVCache expected = c->compress({{k, v}});
      ASSERT_TRUE(at::equal(cache.view()[0].first, expected[0].first));
      ASSERT_TRUE(at::equal(cache.view()[0].second, expected[0].second));
      const at::Tensor pos = cache.positions(0).to(at::kCPU);
      const int64_t sinks = spec.rfind("streaming", 0) == 0 ? 2 : 0;
      for (int64_t i = 0; i < pos.size(2); ++i)
        EXPECT_EQ(pos[1][2][i].item<int64_t>(), i < sinks ? i : n - (pos.size(2) - i));
    }
  }
}

// Positions of steps reach the device lazily (one run per layer between compressions); what
// positions() and compression see must not depend on that: runs with gaps, commit_step from a
// model's own writes, layers of different lengths, a chunked compression, clear().
TEST_P(Cache, PositionsOfStepsWithGapsAndChunkedCompression) {
  auto c = kvc::make_compressor("streaming_llm(start_size=1, recent_size=3, skip_layers=[1])");
  kvc::StaticCache cache(2, 1, 2, kDim, {12}, opts());
  auto to_vector = [](const at::Tensor& pos, int64_t head) {
    const at::Tensor row = pos.to(at::kCPU)[0][head].contiguous();
    return std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
  };
  const std::vector<int64_t> firsts = {0, 1, 2, 10, 11, 20};  // steps of 1 token; gaps at 10 and 20
  for (int64_t first : firsts) {
    for (int64_t l = 0; l < 2; ++l)
      cache.append(l, at::randn({1, 2, 1, kDim}, opts()), at::randn({1, 2, 1, kDim}, opts()), first);
  }
  EXPECT_EQ(to_vector(cache.positions(0), 1), firsts);
  cache.commit_step(2, 30);  // a model wrote two tokens itself (positions 30, 31)
  EXPECT_TRUE(cache.maybe_compress(*c, kvc::Schedule::chunk(8)));
  EXPECT_EQ(to_vector(cache.positions(0), 0), (std::vector<int64_t>{0, 20, 30, 31}));
  EXPECT_EQ(to_vector(cache.positions(1), 0), (std::vector<int64_t>{0, 1, 2, 10, 11, 20, 30, 31}));
  cache.commit_step(1, 32);
  EXPECT_FALSE(cache.maybe_compress(*c, kvc::Schedule::chunk(8)));
  EXPECT_EQ(to_vector(cache.positions(0), 1), (std::vector<int64_t>{0, 20, 30, 31, 32}));
  cache.clear();
  cache.commit_step(2, 7);
  EXPECT_EQ(to_vector(cache.positions(0), 0), (std::vector<int64_t>{7, 8}));
  EXPECT_EQ(to_vector(cache.positions(1), 1), (std::vector<int64_t>{7, 8}));
}

TEST_P(Cache, BadUseIsReported) {
  kvc::StaticCache cache(2, kBatch, kHeads, kDim, {4, 6}, opts());
  EXPECT_EQ(cache.capacity(0), 4);
  EXPECT_EQ(cache.capacity(1), 6);
  const kvc::LayerKV five = tokens(5);  // not a structured binding: C++17 lambdas cannot capture those
  const at::Tensor& k = five.first;
  const at::Tensor& v = five.second;
  expect_error([&] { cache.append(0, k, v, 0); }, {"layer 0 is full", "capacity 4"});
  expect_error([&] { cache.append(2, k, v, 0); }, {"layer 2 out of range"});
  auto wrong = at::randn({kBatch, kHeads + 1, 1, kDim}, opts());
  expect_error([&] { cache.append(1, wrong, wrong, 0); }, {"expected [2, 3, T, 4]"});
  expect_error([&] { cache.append(1, k, v.narrow(2, 0, 4), 0); }, {"same shape"});
  expect_error([] { kvc::Schedule::chunk(0); }, {"slack must be >= 1"});
  expect_error([&] { kvc::StaticCache(3, 1, 1, 1, {4, 4}, opts()); }, {"2 capacities for 3 layers"});
  expect_error([&] { kvc::StaticCache(1, 1, 1, 1, {4}, opts().dtype(at::kInt)); }, {"dtype"});
  // Counts and positions: negative, overflowing, or of another dtype are refused up front.
  expect_error([&] { cache.commit_step(-3, 0); }, {"commit_step", "token count must be >= 0", "-3"});
  expect_error([&] { cache.commit_step(1, -1); }, {"commit_step", "first position", "-1"});
  expect_error([&] { cache.commit_step(2, std::numeric_limits<int64_t>::max()); }, {"first position"});
  expect_error([&] { cache.commit_step(std::numeric_limits<int64_t>::max(), 0); }, {"layer 0 is full"});
  const kvc::LayerKV one = tokens(1);
  expect_error([&] { cache.append(1, one.first, one.second, -5); }, {"append", "first position", "-5"});
  expect_error([&] { cache.append(1, one.first.to(at::kDouble), one.second.to(at::kDouble), 0); },
               {"append", "Double", "the cache Float"});
  expect_error([&] { kvc::StaticCache(1, 1, 1, 1, {std::numeric_limits<int64_t>::max()}, opts()); },
               {"cannot allocate", "capacity [9223372036854775807]"});
  expect_error([&] { kvc::StaticCache(1, 1 << 20, 1 << 20, 1 << 20, {1 << 20}, opts()); },
               {"more elements than int64 counts"});
  EXPECT_EQ(cache.length(0), 0);  // nothing was recorded by the refused calls
  EXPECT_EQ(cache.length(1), 0);
}

TEST_P(Cache, EveryEntryPointRefusesExtremeArguments) {
  constexpr int64_t big = std::numeric_limits<int64_t>::max(), small = std::numeric_limits<int64_t>::min();
  kvc::StaticCache cache(2, kBatch, kHeads, kDim, {4, 6}, opts());
  cache.track_attention();
  cache.track_hidden();
  for (const int64_t layer : {int64_t{-1}, int64_t{2}, big, small}) {
    SCOPED_TRACE(layer);
    const std::vector<std::string> want = {"layer " + std::to_string(layer) + " out of range [0, 2)"};
    auto check = [&](auto&& fn) {
      try {
        fn();
        ADD_FAILURE() << "accepted layer " << layer;
      } catch (const kvc::Error& e) {
        EXPECT_NE(std::string(e.what()).find(want[0]), std::string::npos) << e.what();
      }
    };
    check([&] { cache.capacity(layer); });
    check([&] { cache.length(layer); });
    check([&] { cache.key_buffer(layer); });
    check([&] { cache.value_buffer(layer); });
    check([&] { cache.positions(layer); });
    check([&] { cache.attention_buffer(layer); });
    check([&] { cache.attention(layer); });
    check([&] { cache.accumulate_attention(layer, at::zeros({kBatch, kHeads, 0}, opts()), 1.0); });
    check([&] { cache.slot_bias_buffer(layer); });
    check([&] { cache.hidden(layer); });
    const kvc::LayerKV one = tokens(1);
    check([&] { cache.append(layer, one.first, one.second, 0); });
  }
  const kvc::LayerKV one = tokens(1);
  expect_error([&] { cache.append(0, one.first, one.second, big); }, {"append", "first position"});
  expect_error([&] { cache.append(0, one.first, one.second, small); }, {"append", "first position"});
  expect_error([&] { cache.commit_step(small, 0); }, {"token count must be >= 0"});
  expect_error([&] { cache.commit_step(1, small); }, {"first position"});
  expect_error([&] { cache.require_room(big); }, {"layer 0 is full"});
  cache.commit_step(0, big);  // nothing, at the last position there is
  for (const int64_t bad : {int64_t{0}, int64_t{-1}, small}) {
    expect_error([&] { kvc::StaticCache(bad, 1, 1, 1, {4}, opts()); }, {"must be >= 1"});
    expect_error([&] { kvc::StaticCache(1, bad, 1, 1, {4}, opts()); }, {"must be >= 1"});
    expect_error([&] { kvc::StaticCache(1, 1, bad, 1, {4}, opts()); }, {"must be >= 1"});
    expect_error([&] { kvc::StaticCache(1, 1, 1, bad, {4}, opts()); }, {"must be >= 1"});
    expect_error([&] { kvc::StaticCache(1, 1, 1, 1, {bad}, opts()); }, {"capacity must be >= 1"});
  }
  expect_error([&] { kvc::StaticCache(big, 1, 1, 1, {4, 4}, opts()); }, {"2 capacities for 9223372036854775807 layers"});
  expect_error([&] { kvc::StaticCache(1, big, big, big, {big}, opts()); }, {"more elements than int64 counts"});
  expect_error([&] { kvc::StaticCache(2, 1, 1, 1, {}, opts()); }, {"0 capacities for 2 layers"});
  expect_error([&] { cache.accumulate_attention(0, at::zeros({kBatch, kHeads, 1}, opts()), 1.0); },
               {"accumulate_attention", "expected [2, 3, 0]"});
  EXPECT_EQ(cache.length(0), 0);
}

// --- positions: re-rotation of cached keys ------------------------------------------------------

TEST_P(Cache, RerotationComposesAndInverts) {
  const at::Tensor keys = at::randn({2, 3, 7, 16}, opts());
  const at::Tensor delta = at::randint(-50, 50, {2, 3, 7}, opts().dtype(at::kLong));
  at::Tensor k = keys.clone();
  rt::rerotate_keys(k, delta, 8, 10000.0);
  EXPECT_FALSE(at::allclose(k, keys));
  EXPECT_TRUE(at::equal(k.narrow(3, 8, 8), keys.narrow(3, 8, 8)));  // dims past rotary_ndims untouched
  at::Tensor twice = keys.clone();
  rt::rerotate_keys(twice, delta, 8, 10000.0);
  rt::rerotate_keys(twice, -delta, 8, 10000.0);
  EXPECT_TRUE(at::allclose(twice, keys, 1e-5, 1e-5));
  at::Tensor split = keys.clone();  // rotations compose: a then b == a + b
  rt::rerotate_keys(split, delta, 8, 10000.0);
  rt::rerotate_keys(split, at::full_like(delta, 11), 8, 10000.0);
  at::Tensor once = keys.clone();
  rt::rerotate_keys(once, delta + 11, 8, 10000.0);
  EXPECT_TRUE(at::allclose(split, once, 1e-4, 1e-5));
  // Rotation preserves each rotated pair's norm.
  EXPECT_TRUE(at::allclose(at::norm(k.narrow(3, 0, 8), 2, {-1}), at::norm(keys.narrow(3, 0, 8), 2, {-1}), 1e-5, 1e-5));
  // One delta for every key (host-computed factors) equals the per-key form.
  at::Tensor uniform = keys.clone(), per_key = keys.clone();
  rt::rerotate_keys(uniform, int64_t{-37}, 8, 10000.0);
  rt::rerotate_keys(per_key, at::full_like(delta, -37), 8, 10000.0);
  EXPECT_TRUE(at::allclose(uniform, per_key, 1e-5, 1e-6));
  EXPECT_TRUE(at::equal(uniform.narrow(3, 8, 8), keys.narrow(3, 8, 8)));
  at::Tensor zero = keys.clone();
  rt::rerotate_keys(zero, int64_t{0}, 8, 10000.0);
  EXPECT_TRUE(at::equal(zero, keys));
  expect_error([&] { rt::rerotate_keys(k, delta, 7, 10000.0); }, {"even"});
  expect_error([&] { rt::rerotate_keys(k, int64_t{3}, 7, 10000.0); }, {"even"});
  expect_error([&] { rt::rerotate_keys(k, delta.narrow(2, 0, 3), 8, 10000.0); }, {"delta"});
}

TEST_P(Cache, CacheRuleRotatesKeptKeysToTheirSlots) {
  // streaming_llm(2, 3) on 9 tokens rotated at their slots 0..8 keeps tokens 0, 1, 6, 7, 8 in
  // slots 0..4; under the cache rule the key in slot j must end up rotated at j, i.e. moved by
  // j - kept[j]: 0, 0, -4, -4, -4. Checked through StaticCache's compaction hook.
  auto c = kvc::make_compressor("streaming_llm(start_size=2, recent_size=3)");
  auto [keys, values] = tokens(9);
  kvc::StaticCache cache(1, kBatch, kHeads, kDim, {12}, opts());
  cache.append(0, keys, values, 0);
  std::vector<int64_t> compacted;
  cache.compress(*c, [&](int64_t layer, const kvc::Selection& s) {
    compacted.push_back(layer);
    rt::rotate_kept_keys_to_slots(cache.key_buffer(layer).narrow(2, 0, s.kept()), s, 4, 10000.0);
  });
  EXPECT_EQ(compacted, std::vector<int64_t>{0});
  const std::vector<int64_t> kept = {0, 1, 6, 7, 8};
  ASSERT_EQ(cache.length(0), 5);
  for (int64_t j = 0; j < 5; ++j) {
    const int64_t from = kept[static_cast<size_t>(j)];
    at::Tensor expected = keys.narrow(2, from, 1).clone();
    rt::rerotate_keys(expected, at::full({kBatch, kHeads, 1}, j - from, opts().dtype(at::kLong)), 4, 10000.0);
    EXPECT_TRUE(at::allclose(cache.view()[0].first.narrow(2, j, 1), expected, 1e-6, 1e-6)) << "slot " << j;
    if (j < 2) EXPECT_TRUE(at::equal(cache.view()[0].first.narrow(2, j, 1), keys.narrow(2, from, 1)));  // delta 0
    EXPECT_TRUE(at::equal(cache.view()[0].second.narrow(2, j, 1), values.narrow(2, from, 1)));  // values never rotate
  }
  // Per-(row, head) selections: each head's delta is its own.
  auto h2o = kvc::make_compressor("h2o_l2(start_size=1, heavy_hitter_size=2, recent_size=2)");
  auto [k2, v2] = tokens(9);
  const kvc::Selection s = *h2o->select(kvc::LayerView{k2, 0, 1});
  kvc::LayerKV moved = kvc::apply_selection(k2, v2, s);
  at::Tensor rotated = moved.first.clone();
  rt::rotate_kept_keys_to_slots(rotated, s, 4, 10000.0);
  const at::Tensor from = s.positions(kBatch, kHeads, k2.device());
  for (int64_t b = 0; b < kBatch; ++b)
    for (int64_t h = 0; h < kHeads; ++h)
      for (int64_t j = 0; j < 5; ++j) {
        at::Tensor one = moved.first.narrow(0, b, 1).narrow(1, h, 1).narrow(2, j, 1).clone();
        rt::rerotate_keys(one, at::full({1, 1, 1}, j - from[b][h][j].item<int64_t>(), opts().dtype(at::kLong)), 4, 10000.0);
        EXPECT_TRUE(at::allclose(rotated.narrow(0, b, 1).narrow(1, h, 1).narrow(2, j, 1), one, 1e-6, 1e-6));
      }
  expect_error([&] { rt::rotate_kept_keys_to_slots(rotated.narrow(2, 0, 4), s, 4, 10000.0); }, {"keeps 5", "hold 4"});
}

TEST_P(Cache, AFullSkippedLayerSaysItIsSkipped) {
  // Layer 0 is in skip_layers: it keeps every token, so a capacity sized for the budget
  // overflows there; the error says why and what to change.
  auto c = kvc::make_compressor("recent_only(window_size=4, skip_layers=[0])");
  kvc::StaticCache cache(2, kBatch, kHeads, kDim, {6}, opts());
  for (int64_t t = 0; t < 6; ++t) {
    for (int64_t l = 0; l < 2; ++l) {
      auto [k, v] = tokens(1);
      cache.append(l, k, v, t);
    }
    cache.maybe_compress(*c, kvc::Schedule::every());
  }
  EXPECT_EQ(cache.length(0), 6);
  EXPECT_EQ(cache.length(1), 4);
  const kvc::LayerKV one = tokens(1);  // not a structured binding: C++17 lambdas cannot capture those
  const at::Tensor& k = one.first;
  const at::Tensor& v = one.second;
  expect_error([&] { cache.append(0, k, v, 6); },
               {"layer 0 is full", "skip_layers [0]", "recent_only(window_size=4, skip_layers=[0])",
                "remove it from skip_layers"});
  cache.append(1, k, v, 6);  // the compressed layer has room
  expect_error([&] { cache.append(1, k, v, 7); cache.append(1, k, v, 8); }, {"layer 1 is full", "compress more often"});
}

// Every token's accumulated attention is a function of its position (given once, when it
// arrives), so after any compaction slot j's score must be score(positions[j]): a score never
// belongs to another token. Checked for a shared choice (h2o_attention), per-head choices (h2o,
// out-of-order gathers) and both schedules, against the functional API fed the same scores.
namespace {
// An attention score for a token: distinct per (row, head, position), not monotone in position.
at::Tensor score_of(const at::Tensor& positions) {
  const auto sizes = positions.sizes();
  at::Tensor head = at::arange(sizes[1], positions.options()).view({1, -1, 1});
  at::Tensor row = at::arange(sizes[0], positions.options()).view({-1, 1, 1});
  return (positions * 7919 + head * 31 + row * 17).remainder(101).to(at::kFloat).div_(128);
}
}  // namespace

TEST_P(Cache, AttentionScoresMoveWithTheirTokens) {
  at::manual_seed(5);
  for (const char* spec : {"h2o_attention(start_size=2, heavy_hitter_size=5, recent_size=4, skip_layers=[0])",
                           "h2o(heavy_hitter_size=6, recent_size=5, skip_layers=[0])"}) {
    for (const auto schedule : {kvc::Schedule::every(), kvc::Schedule::chunk(5)}) {
      SCOPED_TRACE(std::string(spec) + (schedule.kind == kvc::Schedule::chunked ? " chunked" : " every step"));
      auto c = kvc::make_compressor(spec);
      kvc::StaticCache cache(kLayers, kBatch, kHeads, kDim, {64}, opts());
      cache.track_attention();
      kvc::KVCache reference(kLayers, {at::empty({kBatch, kHeads, 0, kDim}, opts()), at::empty({kBatch, kHeads, 0, kDim}, opts())});
      std::vector<kvc::LayerInputs> ref_in(kLayers);
      for (auto& in : ref_in) in.attention = at::empty({kBatch, kHeads, 0}, opts());
      int64_t position = 0, compactions = 0;
      for (int64_t step = 0; step < 40; ++step) {
        const int64_t t = step == 0 ? 9 : 1;
        const at::Tensor pos = at::arange(position, position + t, opts().dtype(at::kLong)).expand({kBatch, kHeads, t});
        for (int64_t l = 0; l < kLayers; ++l) {
          auto [k, v] = tokens(t);
          cache.append(l, k, v, position);
          // The new tokens' scores; everything held so far gets 0 more (decay 1).
          at::Tensor add = at::cat({at::zeros({kBatch, kHeads, cache.length(l) - t}, opts()), score_of(pos)}, 2);
          cache.accumulate_attention(l, add, 1.0);
          reference[l] = {at::cat({reference[l].first, k}, 2), at::cat({reference[l].second, v}, 2)};
          ref_in[l].attention = at::cat({ref_in[l].attention, score_of(pos)}, 2);
        }
        position += t;
        if (!cache.maybe_compress(*c, schedule)) continue;
        ++compactions;
        for (int64_t l = 0; l < kLayers; ++l) {  // the functional API on the same cache and scores
          std::optional<kvc::Selection> s = c->select(kvc::LayerView{reference[l].first, l, kLayers, {}, ref_in[l].attention});
          if (!s) continue;
          reference[l] = kvc::apply_selection(reference[l].first, reference[l].second, *s);
          ref_in[l].attention = kvc::take_slots(ref_in[l].attention, *s);
        }
        const kvc::KVCache view = cache.view();
        for (int64_t l = 0; l < kLayers; ++l) {
          ASSERT_TRUE(at::equal(view[l].first, reference[l].first)) << "step " << step << " layer " << l;
          ASSERT_TRUE(at::equal(cache.attention(l), score_of(cache.positions(l)))) << "step " << step << " layer " << l;
          ASSERT_TRUE(at::equal(cache.attention(l), ref_in[l].attention)) << "step " << step << " layer " << l;
          const int64_t len = cache.length(l);
          EXPECT_EQ(cache.attention_buffer(l).narrow(2, len, 64 - len).abs().sum().item<double>(), 0.0);
        }
      }
      EXPECT_GT(compactions, 4);
      EXPECT_EQ(cache.length(0), 48);
      EXPECT_LE(cache.length(1), schedule.kind == kvc::Schedule::chunked ? 11 + 4 : 11);  // + slack - 1
    }
  }
  kvc::StaticCache plain(kLayers, kBatch, kHeads, kDim, {8}, opts());
  expect_error([&] { plain.attention(0); }, {"attention is not tracked"});
  plain.track_attention();
  expect_error([&] { plain.accumulate_attention(0, at::zeros({kBatch, kHeads, 3}, opts()), 1.0); },
               {"accumulate_attention", "layer 0"});
}

TEST_P(Cache, HiddenSlotsMoveWithTheirTokens) {
  // Per-head budgets hide slots; every compaction moves the mask with its tokens, the model's
  // additive mask (slot_bias) is -inf exactly there, and new slots are visible.
  at::manual_seed(6);
  for (const auto schedule : {kvc::Schedule::every(), kvc::Schedule::chunk(5)}) {
    SCOPED_TRACE(schedule.kind == kvc::Schedule::chunked ? "chunked" : "every step");
    auto c = kvc::make_compressor("adakv_h2o(heavy_hitter_size=4, recent_size=3, alpha_safeguard=0.25, skip_layers=[0])");
    kvc::StaticCache cache(kLayers, kBatch, kHeads, kDim, {64}, opts());
    cache.track_attention();
    EXPECT_FALSE(cache.tracks_hidden());
    kvc::KVCache ref(kLayers, {at::empty({kBatch, kHeads, 0, kDim}, opts()), at::empty({kBatch, kHeads, 0, kDim}, opts())});
    std::vector<at::Tensor> ref_att(kLayers, at::empty({kBatch, kHeads, 0}, opts()));
    std::vector<at::Tensor> ref_hidden(kLayers, at::empty({kBatch, kHeads, 0}, opts().dtype(at::kBool)));
    int64_t position = 0, hidden_seen = 0;
    for (int64_t step = 0; step < 30; ++step) {
      const int64_t t = step == 0 ? 9 : 1;
      const at::Tensor pos = at::arange(position, position + t, opts().dtype(at::kLong)).expand({kBatch, kHeads, t});
      for (int64_t l = 0; l < kLayers; ++l) {
        auto [k, v] = tokens(t);
        cache.append(l, k, v, position);
        cache.accumulate_attention(l, at::cat({at::zeros({kBatch, kHeads, cache.length(l) - t}, opts()), score_of(pos)}, 2), 1.0);
        ref[l] = {at::cat({ref[l].first, k}, 2), at::cat({ref[l].second, v}, 2)};
        ref_att[l] = at::cat({ref_att[l], score_of(pos)}, 2);
        ref_hidden[l] = at::cat({ref_hidden[l], at::zeros({kBatch, kHeads, t}, opts().dtype(at::kBool))}, 2);
      }
      position += t;
      if (!cache.maybe_compress(*c, schedule)) continue;
      ASSERT_TRUE(cache.tracks_hidden());
      for (int64_t l = 0; l < kLayers; ++l) {
        kvc::LayerView v{ref[l].first, l, kLayers, {}, ref_att[l]};
        v.hidden = ref_hidden[l];
        std::optional<kvc::Selection> s = c->select(v);
        if (!s) continue;
        ref[l] = kvc::apply_selection(ref[l].first, ref[l].second, *s);
        ref_att[l] = kvc::take_slots(ref_att[l], *s);
        ref_hidden[l] = s->hidden();
      }
      const kvc::KVCache view = cache.view();
      for (int64_t l = 0; l < kLayers; ++l) {
        ASSERT_TRUE(at::equal(view[l].first, ref[l].first)) << "step " << step << " layer " << l;
        ASSERT_TRUE(at::equal(view[l].second, ref[l].second)) << "step " << step << " layer " << l;
        ASSERT_TRUE(at::equal(cache.hidden(l), ref_hidden[l])) << "step " << step << " layer " << l;
        ASSERT_TRUE(at::equal(cache.attention(l), score_of(cache.positions(l))));
        const int64_t len = cache.length(l);
        const at::Tensor bias = cache.slot_bias_buffer(l);
        EXPECT_TRUE(at::equal(bias.narrow(2, 0, len).isinf(), ref_hidden[l]));
        EXPECT_EQ(bias.narrow(2, len, 64 - len).abs().sum().item<double>(), 0.0);
        hidden_seen += ref_hidden[l].sum().item<int64_t>();
      }
    }
    EXPECT_GT(hidden_seen, 0);
    EXPECT_EQ(cache.length(1), schedule.kind == kvc::Schedule::chunked ? 14 + 4 : 14);  // 2 * 7 slots (+ slack - 1)
    // A later span compaction moves the mask with its tokens too.
    const at::Tensor before = cache.hidden(1);
    const int64_t len = cache.length(1);
    cache.compress(*kvc::make_compressor("recent_only(window_size=6, skip_layers=[0])"));
    EXPECT_TRUE(at::equal(cache.hidden(1), before.narrow(2, len - 6, 6)));
    cache.clear();
    EXPECT_EQ(cache.slot_bias_buffer(1).abs().sum().item<double>(), 0.0);
  }
  kvc::StaticCache plain(kLayers, kBatch, kHeads, kDim, {8}, opts());
  expect_error([&] { plain.slot_bias_buffer(0); }, {"hidden slots are not tracked"});
  EXPECT_EQ(plain.hidden(0).numel(), 0);
}

TEST_P(Cache, AttentionAwarePoliciesInHalfPrecisionKeepWhatTheirSelectionKeeps) {
  // float16 and bfloat16 caches with every policy that scores with attention or queries (and
  // the per-head budgets, which hide slots), on both schedules: after every compaction the cache
  // holds bitwise what the functional API's selection keeps from the same keys, values, scores
  // and queries; scores, positions and hidden slots moved with their tokens.
  const std::vector<std::string> specs = {
      "h2o_attention(start_size=2, heavy_hitter_size=4, recent_size=5, decay_factor=0.9, skip_layers=[0])",
      "h2o(heavy_hitter_size=6, recent_size=5, skip_layers=[0])",
      "snapkv(observation_window=3, keep_size=11, pooling_kernel=3, skip_layers=[0])",
      "snapkv(observation_window=3, keep_size=11, pooling_kernel=3, pooling=max, skip_layers=[0])",
      "tova(cache_size=11, skip_layers=[0])",
      "tova(cache_size=11, heads=per_head, skip_layers=[0])",
      "adakv_h2o(heavy_hitter_size=4, recent_size=3, alpha_safeguard=0.25, skip_layers=[0])",
      "adakv_snapkv(observation_window=3, keep_size=8, pooling_kernel=3, skip_layers=[0])",
  };
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    const auto o = opts().dtype(dtype);
    const auto longs = opts().dtype(at::kLong);
    for (const auto& spec : specs) {
      for (const auto schedule : {kvc::Schedule::every(), kvc::Schedule::chunk(4)}) {
        SCOPED_TRACE(spec + " " + c10::toString(dtype) + (schedule.kind == kvc::Schedule::chunked ? " chunked" : " every step"));
        at::manual_seed(7);
        auto c = kvc::make_compressor(spec);
        const kvc::Needs needs = c->needs();
        kvc::StaticCache cache(kLayers, kBatch, kHeads, kDim, {64}, o);
        cache.track_attention();
        kvc::KVCache ref(kLayers, {at::empty({kBatch, kHeads, 0, kDim}, o), at::empty({kBatch, kHeads, 0, kDim}, o)});
        std::vector<at::Tensor> ref_att(kLayers, at::empty({kBatch, kHeads, 0}, opts()));
        std::vector<at::Tensor> ref_pos(kLayers, at::empty({kBatch, kHeads, 0}, longs));
        std::vector<at::Tensor> ref_hidden(kLayers, at::empty({kBatch, kHeads, 0}, opts().dtype(at::kBool)));
        std::vector<at::Tensor> queries(kLayers, at::empty({kBatch, kHeads, 0, kDim}, o));  // every query so far
        int64_t position = 0, compactions = 0, hidden_seen = 0;
        for (int64_t step = 0; step < 30; ++step) {
          const int64_t t = step == 0 ? 9 : 1;
          const at::Tensor pos = at::arange(position, position + t, longs).expand({kBatch, kHeads, t});
          for (int64_t l = 0; l < kLayers; ++l) {
            const at::Tensor k = at::randn({kBatch, kHeads, t, kDim}, o), v = at::randn({kBatch, kHeads, t, kDim}, o);
            cache.append(l, k, v, position);
            const double decay = needs.attention ? needs.decay : 1.0;
            const at::Tensor add = at::cat({at::zeros({kBatch, kHeads, cache.length(l) - t}, opts()), score_of(pos)}, 2);
            cache.accumulate_attention(l, add, decay);
            ref[l] = {at::cat({ref[l].first, k}, 2), at::cat({ref[l].second, v}, 2)};
            ref_att[l] = at::add(add, at::cat({ref_att[l], at::zeros({kBatch, kHeads, t}, opts())}, 2), decay);
            ref_pos[l] = at::cat({ref_pos[l], pos}, 2);
            ref_hidden[l] = at::cat({ref_hidden[l], at::zeros({kBatch, kHeads, t}, opts().dtype(at::kBool))}, 2);
            queries[l] = at::cat({queries[l], at::randn({kBatch, kHeads, t, kDim}, o)}, 2);
          }
          position += t;
          const int64_t w = std::min<int64_t>(needs.queries, position);
          kvc::RecentQueries recent;
          for (int64_t l = 0; l < kLayers; ++l) recent.per_layer.push_back(queries[l].narrow(2, position - w, w));
          recent.positions = at::arange(position - w, position, longs);
          if (!cache.maybe_compress(*c, schedule, nullptr, &recent)) continue;
          ++compactions;
          for (int64_t l = 0; l < kLayers; ++l) {
            kvc::LayerView view{ref[l].first, l, kLayers, ref[l].second, ref_att[l]};
            if (needs.queries > 0) {
              view.queries = recent.per_layer[l];
              view.query_positions = recent.positions;
              view.key_positions = ref_pos[l];
            }
            if (needs.hides) view.hidden = ref_hidden[l];
            std::optional<kvc::Selection> s = c->select(view);
            if (!s) continue;
            ref[l] = kvc::apply_selection(ref[l].first, ref[l].second, *s);
            ref_att[l] = kvc::take_slots(ref_att[l], *s);
            ref_pos[l] = kvc::take_slots(ref_pos[l], *s);
            ref_hidden[l] = s->hidden().defined() ? s->hidden() : kvc::take_slots(ref_hidden[l], *s);
          }
          const kvc::KVCache got = cache.view();
          for (int64_t l = 0; l < kLayers; ++l) {
            ASSERT_EQ(got[l].first.scalar_type(), dtype);
            ASSERT_TRUE(at::equal(got[l].first, ref[l].first)) << "step " << step << " layer " << l;
            ASSERT_TRUE(at::equal(got[l].second, ref[l].second)) << "step " << step << " layer " << l;
            ASSERT_TRUE(at::equal(cache.positions(l), ref_pos[l])) << "step " << step << " layer " << l;
            ASSERT_TRUE(at::equal(cache.attention(l), ref_att[l])) << "step " << step << " layer " << l;
            ASSERT_TRUE(at::equal(cache.hidden(l), ref_hidden[l])) << "step " << step << " layer " << l;
            hidden_seen += ref_hidden[l].sum().item<int64_t>();
          }
        }
        EXPECT_GT(compactions, 4);
        EXPECT_EQ(cache.length(0), 38);  // the skipped layer
        EXPECT_LT(cache.length(1), 38);  // the others were compressed
        EXPECT_EQ(hidden_seen > 0, needs.hides);
      }
    }
  }
}
