// Exact kept positions for every policy on caches whose key norms are chosen by hand. Each test
// runs on CPU and, where available, on CUDA.
#include "test_support.hpp"

#include <set>

using namespace kvtest;
namespace kvc = kvcompress;

class Policies : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cuda" && !at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  }
  at::Device dev() const { return device_named(GetParam()); }
  kvc::LayerKV layer(const Norms& n, at::ScalarType dtype = at::kFloat) const {
    return layer_from_norms(n, 4, dtype, dev());
  }
  // Two rows, two heads, each (row, head) with its own norm ordering.
  kvc::LayerKV mixed(int64_t seq) const {
    return layer({{ramp(seq, true), ramp(seq, false)}, {ramp(seq, false), ramp(seq, true)}});
  }
};

INSTANTIATE_TEST_SUITE_P(Devices, Policies, ::testing::Values("cpu", "cuda"));

// --- streaming_llm / recent_only: contiguous spans ---------------------------------------------

TEST_P(Policies, StreamingLLMKeepsSinksAndRecent) {
  auto in = mixed(10);
  auto out = kvc::streaming_llm_compress({in}, {2, 3}, {});
  expect_kept(out[0], in, everywhere(2, 2, {0, 1, 7, 8, 9}));
}

TEST_P(Policies, StreamingLLMWithinBudgetIsUnchanged) {
  auto in = mixed(5);
  expect_unchanged(kvc::streaming_llm_compress({in}, {2, 3}, {})[0], in);
}

TEST_P(Policies, StreamingLLMWithoutSinks) {
  auto in = mixed(6);
  expect_kept(kvc::streaming_llm_compress({in}, {0, 2}, {})[0], in, everywhere(2, 2, {4, 5}));
}

TEST_P(Policies, RecentOnlyKeepsLastWindow) {
  auto in = mixed(9);
  expect_kept(kvc::recent_only_compress({in}, {3}, {})[0], in, everywhere(2, 2, {6, 7, 8}));
  auto small = mixed(3);
  expect_unchanged(kvc::recent_only_compress({small}, {3}, {})[0], small);
}

TEST_P(Policies, SkipLayersAreUnchanged) {
  auto a = mixed(9), b = mixed(9), c = mixed(9);
  auto out = kvc::recent_only_compress({a, b, c});  // default skip_layers=[0,1]
  expect_unchanged(out[0], a);
  expect_unchanged(out[1], b);
  expect_kept(out[2], c, everywhere(2, 2, {0, 1, 2, 3, 4, 5, 6, 7, 8}));  // 9 <= 512: unchanged
  auto out2 = kvc::recent_only_compress({a, b, c}, {2}, {1});
  expect_kept(out2[0], a, everywhere(2, 2, {7, 8}));
  expect_unchanged(out2[1], b);
  expect_kept(out2[2], c, everywhere(2, 2, {7, 8}));
}

// --- l2 (KnormPress) ----------------------------------------------------------------------------

TEST_P(Policies, L2KeepsSmallestNormsPerRowAndHead) {
  // Row 1 head 0 has a scrambled order: smallest four norms 1,2,3,4 sit at 1,3,5,7.
  auto in = layer({{ramp(8, true), ramp(8, false)}, {{5, 1, 7, 2, 8, 3, 6, 4}, ramp(8, true)}});
  auto out = kvc::l2_compress({in}, {0.5, 4}, {});
  expect_kept(out[0], in, {{{0, 1, 2, 3}, {4, 5, 6, 7}}, {{1, 3, 5, 7}, {0, 1, 2, 3}}});
}

TEST_P(Policies, L2CeilIsOfTheDoubleProduct) {
  // ceil(0.14 * 50) = 8: the double product is 7.000000000000001. (0.7 * 10 is exactly 7.0 in
  // doubles, so it gives 7.)
  auto in = mixed(50);
  expect_kept(kvc::l2_compress({in}, {0.14, 0}, {})[0], in,
              {{span(0, 8), span(42, 8)}, {span(42, 8), span(0, 8)}});
  auto ten = mixed(10);
  expect_kept(kvc::l2_compress({ten}, {0.7, 0}, {})[0], ten,
              {{span(0, 7), span(3, 7)}, {span(3, 7), span(0, 7)}});
}

TEST_P(Policies, L2BoundaryRules) {
  auto in = mixed(8);
  expect_unchanged(kvc::l2_compress({in}, {0.5, 8}, {})[0], in);   // seq <= prune_after
  expect_unchanged(kvc::l2_compress({in}, {1.0, 0}, {})[0], in);   // keep_ratio >= 1
  expect_unchanged(kvc::l2_compress({in}, {0.99, 0}, {})[0], in);  // ceil(7.92) = 8 = seq
  expect_kept(kvc::l2_compress({in}, {0.5, 7}, {})[0], in,         // seq = prune_after + 1
              {{span(0, 4), span(4, 4)}, {span(4, 4), span(0, 4)}});
  // The default keep_ratio is 1 (keep everything), shown on a layer that neither the default
  // prune_after (1000) nor the default skip_layers ([0,1]) would leave alone.
  kvc::L2Options defaults;
  EXPECT_EQ(defaults.keep_ratio, 1.0);
  defaults.prune_after = 0;
  expect_unchanged(kvc::l2_compress({in}, defaults, {})[0], in);
  defaults.keep_ratio = 0.5;  // the same call with any other ratio compresses
  EXPECT_EQ(kvc::l2_compress({in}, defaults, {})[0].first.size(2), 4);
}

// --- fix_size_l2 --------------------------------------------------------------------------------

TEST_P(Policies, FixSizeKeepLowWithProtectedTail) {
  // fix 5, keep_ratio 0.5: protected = int(2.5) = 2, zone [0, 6), 3 chosen from it.
  auto in = mixed(8);
  kvc::FixSizeL2Options o{5, 0.5, kvc::FixSizeStrategy::keep_low};
  expect_kept(kvc::fix_size_l2_compress({in}, o, {})[0], in,
              {{{0, 1, 2, 6, 7}, {3, 4, 5, 6, 7}}, {{3, 4, 5, 6, 7}, {0, 1, 2, 6, 7}}});
}

TEST_P(Policies, FixSizeKeepHigh) {
  auto in = mixed(8);
  kvc::FixSizeL2Options o{5, 0.5, kvc::FixSizeStrategy::keep_high};
  expect_kept(kvc::fix_size_l2_compress({in}, o, {})[0], in,
              {{{3, 4, 5, 6, 7}, {0, 1, 2, 6, 7}}, {{0, 1, 2, 6, 7}, {3, 4, 5, 6, 7}}});
}

TEST_P(Policies, FixSizeNoProtectedTail) {
  auto in = mixed(8);
  expect_kept(kvc::fix_size_l2_compress({in}, {3, 0.0, kvc::FixSizeStrategy::keep_low}, {})[0], in,
              {{span(0, 3), span(5, 3)}, {span(5, 3), span(0, 3)}});
}

TEST_P(Policies, FixSizeAllProtectedKeepsLastTokens) {
  auto in = mixed(8);  // keep_ratio 1: protected = fix_kv_size, nothing chosen by norm
  expect_kept(kvc::fix_size_l2_compress({in}, {3, 1.0, kvc::FixSizeStrategy::keep_low}, {})[0], in,
              everywhere(2, 2, {5, 6, 7}));
  auto small = mixed(3);
  expect_unchanged(kvc::fix_size_l2_compress({small}, {3, 0.5, kvc::FixSizeStrategy::keep_low}, {})[0], small);
}

TEST_P(Policies, FixSizeRandomIsAUniformSubsetOfTheZone) {
  auto in = layer({{ramp(40, true), ramp(40, true)}, {ramp(40, true), ramp(40, true)}});
  at::manual_seed(7);
  auto out = kvc::fix_size_l2_compress({in}, {10, 0.2, kvc::FixSizeStrategy::random}, {})[0];
  ASSERT_EQ(out.first.size(2), 10);
  // Keys encode their position (norm t + 1), so the kept positions can be read back.
  at::Tensor pos = out.first.select(-1, 0).to(at::kCPU).to(at::kLong) - 1;  // [2, 2, 10]
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t h = 0; h < 2; ++h) {
      auto p = pos[b][h];
      for (int64_t i = 0; i < 8; ++i) {
        EXPECT_LT(p[i].item<int64_t>(), 38);  // chosen from [0, 38)
        if (i) EXPECT_LT(p[i - 1].item<int64_t>(), p[i].item<int64_t>());
      }
      EXPECT_EQ(p[8].item<int64_t>(), 38);
      EXPECT_EQ(p[9].item<int64_t>(), 39);
    }
  // Different (row, head) draw independently: with 8 of 38 the chance of four equal draws is nil.
  EXPECT_FALSE(at::equal(pos[0][0], pos[0][1]) && at::equal(pos[0][0], pos[1][0]) &&
               at::equal(pos[0][0], pos[1][1]));
}

// --- h2o_l2 -------------------------------------------------------------------------------------

TEST_P(Policies, H2OKeepsSinksHeavyHittersRecent) {
  // start 1, heavy 2, recent 2, seq 9: middle [1, 7).
  auto in = layer({{ramp(9, true), ramp(9, false)}, {{9, 5, 1, 8, 2, 7, 3, 4, 6}, ramp(9, true)}});
  auto out = kvc::h2o_l2_compress({in}, {1, 2, 2}, {});
  expect_kept(out[0], in,
              {{{0, 1, 2, 7, 8}, {0, 5, 6, 7, 8}}, {{0, 2, 4, 7, 8}, {0, 1, 2, 7, 8}}});
}

TEST_P(Policies, H2OWithoutHeavyHittersAndWithinBudget) {
  auto in = mixed(9);
  expect_kept(kvc::h2o_l2_compress({in}, {2, 0, 3}, {})[0], in, everywhere(2, 2, {0, 1, 6, 7, 8}));
  expect_unchanged(kvc::h2o_l2_compress({in}, {2, 4, 3}, {})[0], in);  // seq 9 = budget
}

// --- snapkv_lite --------------------------------------------------------------------------------

// Prefix norms [1,17,8,15,18,9,4,6] give scores 18 - n = [17,1,10,3,0,9,14,12] (+1e-6).
// No pooling: top 4 at {0,2,6,7}. Kernel 2 (pad 1, trimmed): (s[i-1]+s[i])/2 =
// [8.5,9,5.5,6.5,1.5,4.5,11.5,13] -> {0,1,6,7}. Kernel 3: (s[i-1]+s[i]+s[i+1])/3 =
// [6,9.33,4.67,4.33,4,7.67,11.67,8.67] -> {1,5,6,7}. Window: last 2 (positions 8, 9).
static const std::vector<double> kSnapNorms = {1, 17, 8, 15, 18, 9, 4, 6, 3, 5};

TEST_P(Policies, SnapKVNoPooling) {
  auto in = layer({{kSnapNorms}});
  expect_kept(kvc::snapkv_lite_compress({in}, {2, 6, 1}, {})[0], in, {{{0, 2, 6, 7, 8, 9}}});
}

TEST_P(Policies, SnapKVEvenKernelDropsTheExtraPooledEntry) {
  auto in = layer({{kSnapNorms}});
  expect_kept(kvc::snapkv_lite_compress({in}, {2, 6, 2}, {})[0], in, {{{0, 1, 6, 7, 8, 9}}});
}

TEST_P(Policies, SnapKVOddKernel) {
  auto in = layer({{kSnapNorms, ramp(10, true)}});
  // Head 1: rising norms give falling scores; pooled with kernel 3 the top 4 are {0,1,2,3}.
  expect_kept(kvc::snapkv_lite_compress({in}, {2, 6, 3}, {})[0], in,
              {{{1, 5, 6, 7, 8, 9}, {0, 1, 2, 3, 8, 9}}});
}

TEST_P(Policies, SnapKVBoundaries) {
  auto in = layer({{kSnapNorms}});
  // keep_size <= observation_window: m <= 0, only the window survives.
  expect_kept(kvc::snapkv_lite_compress({in}, {3, 2, 5}, {})[0], in, {{{7, 8, 9}}});
  // prefix <= 0: unchanged even though seq > keep_size.
  expect_unchanged(kvc::snapkv_lite_compress({in}, {10, 4, 5}, {})[0], in);
  // seq <= keep_size: unchanged.
  expect_unchanged(kvc::snapkv_lite_compress({in}, {2, 10, 5}, {})[0], in);
  // prefix (3) < kernel (5): no pooling; scores of [1,17,8] -> top 2 = {0, 2}.
  auto short_in = layer({{{1, 17, 8, 2, 2}}});
  expect_kept(kvc::snapkv_lite_compress({short_in}, {2, 4, 5}, {})[0], short_in, {{{0, 2, 3, 4}}});
}

// --- pyramid_kv ---------------------------------------------------------------------------------

TEST(PyramidBudgets, ProfilesAndClamp) {
  using P = kvc::policies::PyramidKV;
  kvc::PyramidKVOptions o;  // 512, 0.9, 64, exponential
  EXPECT_EQ(P::layer_budget(o, 0, 32), 512);
  EXPECT_EQ(P::layer_budget(o, 1, 32), 460);   // int(460.8)
  EXPECT_EQ(P::layer_budget(o, 2, 32), 414);   // int(414.72)
  EXPECT_EQ(P::layer_budget(o, 3, 32), 373);   // int(373.248)
  EXPECT_EQ(P::layer_budget(o, 31, 32), 64);   // 512*0.9^31 = 19.6 -> clamped to min_size
  o.profile = kvc::PyramidProfile::linear;
  EXPECT_EQ(P::layer_budget(o, 0, 4), 512);
  EXPECT_EQ(P::layer_budget(o, 1, 4), 362);   // int(512 - 448 / 3) = int(362.67)
  o.base_size = 16; o.min_size = 4;
  EXPECT_EQ(P::layer_budget(o, 1, 4), 12);
  EXPECT_EQ(P::layer_budget(o, 3, 4), 4);
  EXPECT_EQ(P::layer_budget(o, 0, 1), 16);    // max(L - 1, 1)
  o.profile = kvc::PyramidProfile::constant;
  EXPECT_EQ(P::layer_budget(o, 3, 4), 16);
}

TEST_P(Policies, PyramidPerLayerBudgets) {
  // base 16, decay 0.5, min 4, 3 layers: budgets 16, 8, 4.
  auto l0 = mixed(20), l1 = mixed(20), l2 = mixed(20);
  auto out = kvc::pyramid_kv_compress({l0, l1, l2}, {16, 0.5, 4, kvc::PyramidProfile::exponential}, {});
  // Layer 0, size 16: start 2, recent 8, middle [2, 12) keeps 6.
  const auto rise0 = join({span(0, 2), span(2, 6), span(12, 8)});
  const auto fall0 = join({span(0, 2), span(6, 6), span(12, 8)});
  expect_kept(out[0], l0, {{rise0, fall0}, {fall0, rise0}});
  // Layer 1, size 8: start 1, recent 4, middle [1, 16) keeps 3.
  const auto rise1 = join({span(0, 1), span(1, 3), span(16, 4)});
  const auto fall1 = join({span(0, 1), span(13, 3), span(16, 4)});
  expect_kept(out[1], l1, {{rise1, fall1}, {fall1, rise1}});
  // Layer 2, size 4: start 0, recent 2, middle [0, 18) keeps 2.
  const auto rise2 = join({span(0, 2), span(18, 2)});
  const auto fall2 = join({span(16, 2), span(18, 2)});
  expect_kept(out[2], l2, {{rise2, fall2}, {fall2, rise2}});
}

// --- adaptive_l2 --------------------------------------------------------------------------------

TEST_P(Policies, AdaptiveSoftBand) {
  // soft 8, hard 16, seq 12: progress 0.5, ratio 0.75, n = 9, protected int(1.8) = 1,
  // history 8 smallest of [0, 11), then position 11.
  auto in = mixed(12);
  auto out = kvc::adaptive_l2_compress({in}, {12, 8, 16, 0.5, 1.0}, {});
  const auto rise = join({span(0, 8), {11}}), fall = join({span(3, 8), {11}});
  expect_kept(out[0], in, {{rise, fall}, {fall, rise}});
}

TEST_P(Policies, AdaptiveHardLimit) {
  // seq 20 > hard 16, target 12: first 4, 2 of middle [4, 14), last 6.
  auto in = mixed(20);
  auto out = kvc::adaptive_l2_compress({in}, {12, 8, 16, 0.5, 1.0}, {});
  const auto rise = join({span(0, 4), {4, 5}, span(14, 6)});
  const auto fall = join({span(0, 4), {12, 13}, span(14, 6)});
  expect_kept(out[0], in, {{rise, fall}, {fall, rise}});
  // target 8: middle_keep = 8 - 4 - 4 = 0, so the last 8 tokens.
  expect_kept(kvc::adaptive_l2_compress({in}, {8, 8, 16, 0.5, 1.0}, {})[0], in,
              everywhere(2, 2, span(12, 8)));
}

TEST_P(Policies, AdaptiveUnchangedCases) {
  auto in = mixed(8);
  expect_unchanged(kvc::adaptive_l2_compress({in}, {12, 8, 16, 0.5, 1.0}, {})[0], in);  // seq <= soft
  auto mid = mixed(12);
  expect_unchanged(kvc::adaptive_l2_compress({mid}, {12, 8, 16, 1.0, 1.0}, {})[0], mid);  // n = seq
  auto big = mixed(20);
  expect_unchanged(kvc::adaptive_l2_compress({big}, {24, 8, 16, 0.5, 1.0}, {})[0], big);  // seq <= target
}

// --- dtypes, input untouched, layers of different lengths ---------------------------------------

TEST_P(Policies, HalfPrecisionCachesKeepTheSameTokens) {
  for (auto dtype : {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto in = layer({{ramp(10, true), ramp(10, false)}}, dtype);
    expect_kept(kvc::l2_compress({in}, {0.5, 0}, {})[0], in, {{span(0, 5), span(5, 5)}});
    auto snap = layer({{kSnapNorms}}, dtype);
    expect_kept(kvc::snapkv_lite_compress({snap}, {2, 6, 3}, {})[0], snap, {{{1, 5, 6, 7, 8, 9}}});
    expect_kept(kvc::streaming_llm_compress({in}, {1, 2}, {})[0], in, {{{0, 8, 9}, {0, 8, 9}}});
  }
}

TEST_P(Policies, InputIsNeverModifiedAndLayersMayDiffer) {
  auto a = mixed(12), b = mixed(7);
  auto a_keys = a.first.clone(), a_values = a.second.clone();
  auto out = kvc::h2o_l2_compress({a, b}, {1, 2, 3}, {});
  EXPECT_TRUE(at::equal(a.first, a_keys));
  EXPECT_TRUE(at::equal(a.second, a_values));
  EXPECT_EQ(out[0].first.size(2), 6);
  EXPECT_EQ(out[1].first.size(2), 6);
  EXPECT_FALSE(out[0].first.is_same(a.first));
  EXPECT_FALSE(out[0].first.data_ptr() == a.first.data_ptr());
}

TEST_P(Policies, EveryPolicyKeepsItsBudgetOfDistinctOriginalTokensInEveryRowAndHead) {
  // Norms 1..64 differ within each (row, head), so a kept key names its source position. Each
  // rule keeps 20 here (l2: ceil(64 * 0.3); pyramid_kv layer 0: base; adaptive_l2: seq > hard
  // limit -> target), every (row, head) 20 distinct tokens whose keys and values are the
  // originals'.
  auto in = layer_from_norms({{ramp(64, true), ramp(64, false), ramp(64, true)},
                              {ramp(64, false), ramp(64, true), ramp(64, false)}},
                             8, at::kFloat, dev());
  const at::Tensor keys = in.first.cpu(), values = in.second.cpu();
  for (const auto& spec : {"l2(keep_ratio=0.3, prune_after=0, skip_layers=[])",
                           "fix_size_l2(fix_kv_size=20, keep_ratio=0.5, skip_layers=[])",
                           "streaming_llm(start_size=4, recent_size=16)",
                           "h2o_l2(start_size=4, heavy_hitter_size=8, recent_size=8)",
                           "snapkv_lite(observation_window=8, keep_size=20)",
                           "pyramid_kv(base_size=20, min_size=8)",
                           "adaptive_l2(target_size=20, soft_limit=8, hard_limit=32)",
                           "recent_only(window_size=20, skip_layers=[])"}) {
    SCOPED_TRACE(spec);
    auto out = kvc::make_compressor(spec)->compress({in});
    ASSERT_EQ(out[0].first.size(2), 20);
    const at::Tensor k = out[0].first.cpu(), v = out[0].second.cpu();
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t h = 0; h < 3; ++h) {
        std::set<int64_t> seen;
        for (int64_t j = 0; j < 20; ++j) {
          // The source position: the one input key equal to this kept key.
          const at::Tensor same = (keys[b][h] == k[b][h][j]).all(-1).nonzero();
          ASSERT_EQ(same.size(0), 1) << "row " << b << " head " << h << " slot " << j;
          const int64_t t = same[0][0].item<int64_t>();
          EXPECT_TRUE(seen.insert(t).second) << "position " << t << " kept twice";
          EXPECT_TRUE(at::equal(v[b][h][j], values[b][h][t]));
        }
      }
  }
}

// --- attention-aware policies: scores and queries given by hand ----------------------------------

namespace {

// A [batch, heads, seq] float32 tensor from nested values (binary fractions: sums are exact).
at::Tensor per_slot(const Norms& v, at::Device dev) {
  const int64_t b = static_cast<int64_t>(v.size()), h = static_cast<int64_t>(v[0].size()),
                s = static_cast<int64_t>(v[0][0].size());
  at::Tensor t = at::zeros({b, h, s}, at::kDouble);
  auto acc = t.accessor<double, 3>();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < h; ++j)
      for (int64_t k = 0; k < s; ++k) acc[i][j][k] = v[i][j][k];
  return t.to(at::kFloat).to(dev);
}

kvc::LayerInputs with_attention(const Norms& v, at::Device dev) {
  kvc::LayerInputs in;
  in.attention = per_slot(v, dev);
  return in;
}

// `w` queries c * e_0: against layer_from_norms keys (n * e_0) a query's logits are c * n / 2.
kvc::LayerInputs with_queries(const kvc::LayerKV& layer, int64_t w, double c) {
  kvc::LayerInputs in;
  const auto& k = layer.first;
  in.queries = at::zeros({k.size(0), k.size(1), w, k.size(3)}, k.options());
  in.queries.select(3, 0).fill_(c);
  return in;
}

}  // namespace

TEST_P(Policies, H2OAttentionKeepsSinksHeavyHittersSharedByHeadsAndRecent) {
  // seq 12, start 2, heavy 3, recent 4: the middle is [2, 8). Sinks and recent carry large
  // scores, which must not matter: they are kept by place, not by score.
  const double x = 4.0;
  const Norms att = {
      // Row 0: summed over heads, the middle's largest are 5 (1), 3 (0.875), 7 (0.75); head 1 alone
      // would choose 7, 3 and 4, so the choice is shared, not per head.
      {{x, x, 0.125, 0.5, 0, 0.875, 0, 0.25, x, x, x, x}, {x, x, 0, 0.375, 0.125, 0.125, 0, 0.5, x, x, x, x}},
      // Row 1: 2, 3, 5 and 6 tie; the earlier positions win.
      {{x, x, 0.5, 0.5, 0, 0.5, 0.5, 0, x, x, x, x}, {x, x, 0, 0, 0, 0, 0, 0, x, x, x, x}}};
  auto in = mixed(12);
  auto out = kvc::h2o_attention_compress({in}, {2, 3, 4, 0.9}, {}, {with_attention(att, dev())});
  const auto row0 = std::vector<int64_t>{0, 1, 3, 5, 7, 8, 9, 10, 11};
  const auto row1 = std::vector<int64_t>{0, 1, 2, 3, 5, 8, 9, 10, 11};
  expect_kept(out[0], in, {{row0, row0}, {row1, row1}});
  // Within budget (seq 12 <= 2 + 6 + 4): unchanged.
  expect_unchanged(kvc::h2o_attention_compress({in}, {2, 6, 4, 0.9}, {}, {with_attention(att, dev())})[0], in);
  // No heavy hitters: sinks + recent, as StreamingLLM.
  expect_kept(kvc::h2o_attention_compress({in}, {2, 0, 4, 0.9}, {}, {with_attention(att, dev())})[0], in,
              everywhere(2, 2, {0, 1, 8, 9, 10, 11}));
}

TEST_P(Policies, H2OKeepsEachHeadsHeavyHittersAndRecent) {
  // seq 8, heavy 2, recent 3: the middle is [0, 5), chosen per head.
  const Norms att = {{{0.5, 0.125, 0.75, 0, 0.25, 9, 9, 9}, {0, 0.5, 0, 0.5, 0.5, 9, 9, 9}},
                     {{0.25, 0.25, 0.25, 0.25, 0.25, 0, 0, 0}, {0, 0, 0, 0.125, 1, 0, 0, 0}}};
  auto in = mixed(8);
  auto out = kvc::h2o_compress({in}, {2, 3}, {}, {with_attention(att, dev())});
  expect_kept(out[0], in, {{{0, 2, 5, 6, 7}, {1, 3, 5, 6, 7}}, {{0, 1, 5, 6, 7}, {3, 4, 5, 6, 7}}});
  expect_unchanged(kvc::h2o_compress({in}, {5, 3}, {}, {with_attention(att, dev())})[0], in);
}

TEST_P(Policies, TOVAKeepsWhatTheLastQueryAttendsTo) {
  // One row, two heads, 6 tokens, keep 3. Logits of the last query are 4 * norm.
  auto in = layer({{{1, 5, 2, 4, 3, 0}, {0, 0, 0, 0, 0, 9}}});
  kvc::TOVAOptions o{3, kvc::TOVAHeads::per_head};
  // Per head: head 0 the three largest norms; head 1 position 5, then the earliest of the ties.
  expect_kept(kvc::tova_compress({in}, o, {}, {with_queries(in, 1, 8.0)})[0], in, {{{1, 3, 4}, {0, 1, 5}}});
  // The paper's rule: attention averaged over heads, one choice for the layer. Position 5 has
  // mean ~0.5 (head 1 attends only to it), position 1 ~0.49 (head 0's favourite), then 3.
  o.heads = kvc::TOVAHeads::mean;
  expect_kept(kvc::tova_compress({in}, o, {}, {with_queries(in, 1, 8.0)})[0], in, everywhere(1, 2, {1, 3, 5}));
  o.cache_size = 6;
  expect_unchanged(kvc::tova_compress({in}, o, {}, {with_queries(in, 1, 8.0)})[0], in);
}

TEST_P(Policies, SnapKVKeepsThePrefixTheWindowVotesForAndTheWindow) {
  // seq 8, window 2, keep 5: 3 of the prefix [0, 6) plus the window [6, 8).
  auto in = layer({{{1, 4, 2, 5, 3, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}}});
  kvc::SnapKVOptions o{2, 5, 0, kvc::SnapKVPooling::avg};
  expect_kept(kvc::snapkv_compress({in}, o, {}, {with_queries(in, 2, 4.0)})[0], in,
              {{{1, 3, 4, 6, 7}, {0, 1, 2, 6, 7}}});
  // Pooling spreads a spike to its neighbours: kernel 3 around position 2 gives 1, 2, 3.
  auto spike = layer({{{0, 0, 6, 0, 0, 0, 0, 0}}});
  for (auto pooling : {kvc::SnapKVPooling::avg, kvc::SnapKVPooling::max}) {
    kvc::SnapKVOptions p{2, 5, 3, pooling};
    expect_kept(kvc::snapkv_compress({spike}, p, {}, {with_queries(spike, 2, 4.0)})[0], spike, {{{1, 2, 3, 6, 7}}});
  }
  // A query never sees a token that came after it: slot 0 holds position 99 (later than the
  // window's queries at 6 and 7), so its large norm earns no votes.
  auto late = layer({{{9, 0, 0, 1, 2, 3, 0, 0}}});
  kvc::LayerInputs li = with_queries(late, 2, 4.0);
  li.key_positions = at::tensor(std::vector<int64_t>{99, 1, 2, 3, 4, 5, 6, 7}, at::kLong).view({1, 1, 8}).to(dev());
  li.query_positions = at::tensor(std::vector<int64_t>{6, 7}, at::kLong);
  expect_kept(kvc::snapkv_compress({late}, o, {}, {li})[0], late, {{{3, 4, 5, 6, 7}}});
  const at::Tensor probs = kvc::window_attention(kvc::LayerView{late.first, 0, 1, {}, {}, li.queries,
                                                                li.query_positions, li.key_positions});
  EXPECT_EQ(probs.select(-1, 0).abs().sum().item<double>(), 0.0);
  EXPECT_NEAR(probs.sum(-1).min().item<double>(), 1.0, 1e-6);
}

TEST_P(Policies, ExactTiesKeepTheEarlierPositionsInEveryScoringPolicy) {
  // All 16 keys have norm 1, every slot the same attention, every query the same logits: each
  // score ties, and the documented rule (docs/ALGORITHMS.md: ties keep the earlier position)
  // decides every choice. Places kept by rule (sinks, recent, windows) are as usual.
  const int64_t seq = 16;
  auto in = layer_from_norms({{std::vector<double>(seq, 1.0), std::vector<double>(seq, 1.0)}}, 4, at::kFloat, dev());
  kvc::LayerInputs inputs = with_queries(in, 4, 2.0);
  inputs.attention = at::full({1, 2, seq}, 0.25, at::TensorOptions().device(dev()));
  const auto upto = [](int64_t a, int64_t b) {  // [a, b)
    std::vector<int64_t> v;
    for (int64_t i = a; i < b; ++i) v.push_back(i);
    return v;
  };
  const std::vector<std::pair<std::string, std::vector<int64_t>>> cases = {
      {"l2(keep_ratio=0.5, prune_after=0, skip_layers=[])", upto(0, 8)},
      {"fix_size_l2(fix_kv_size=6, keep_ratio=0.5, strategy=keep_low, skip_layers=[])", join({upto(0, 3), upto(13, 16)})},
      {"fix_size_l2(fix_kv_size=6, keep_ratio=0.5, strategy=keep_high, skip_layers=[])", join({upto(0, 3), upto(13, 16)})},
      {"h2o_l2(start_size=2, heavy_hitter_size=3, recent_size=4)", join({upto(0, 5), upto(12, 16)})},
      {"snapkv_lite(observation_window=4, keep_size=8, pooling_kernel=1)", join({upto(0, 4), upto(12, 16)})},
      {"pyramid_kv(base_size=8, min_size=8)", join({upto(0, 4), upto(12, 16)})},  // start 1, middle 3, recent 4
      {"adaptive_l2(target_size=10, soft_limit=5, hard_limit=6)", join({upto(0, 5), upto(11, 16)})},  // seq > hard
      {"adaptive_l2(target_size=8, soft_limit=8, hard_limit=32)", join({upto(0, 9), upto(14, 16)})},  // n 11: 9 + 2
      {"h2o_attention(start_size=2, heavy_hitter_size=3, recent_size=4)", join({upto(0, 5), upto(12, 16)})},
      {"h2o(heavy_hitter_size=3, recent_size=4)", join({upto(0, 3), upto(12, 16)})},
      {"snapkv(observation_window=4, keep_size=8, pooling_kernel=1)", join({upto(0, 4), upto(12, 16)})},
      {"tova(cache_size=8, heads=per_head)", upto(0, 8)},
      {"tova(cache_size=8, heads=mean)", upto(0, 8)},
  };
  for (const auto& [spec, kept] : cases) {
    SCOPED_TRACE(spec);
    auto c = kvc::make_compressor(spec);
    expect_kept(c->compress({in}, {inputs})[0], in, everywhere(1, 2, kept));
  }
}

TEST_P(Policies, AttentionPoliciesNameWhatIsMissingOrMisshapen) {
  auto in = mixed(12);
  expect_error([&] { kvc::h2o_compress({in}, {2, 3}); },
               {"h2o: layer 0: needs the accumulated attention", "was not provided", "contract version 3"});
  expect_error([&] { kvc::make_compressor("tova(cache_size=4)")->compress({in}); },
               {"tova: layer 0", "last 1 queries", "not provided"});
  kvc::LayerInputs short_att;
  short_att.attention = at::zeros({2, 2, 11}, at::TensorOptions().device(dev()));
  expect_error([&] { kvc::h2o_compress({in}, {2, 3}, {}, {short_att}); }, {"accumulated attention must be [2, 2, 12]"});
  kvc::LayerInputs wide_q;
  wide_q.queries = at::zeros({2, 2, 1, 5}, at::TensorOptions().device(dev()));
  expect_error([&] { kvc::snapkv_compress({in}, {2, 5}, {}, {wide_q}); }, {"queries must be [2, 2, W >= 1, 4]"});
  expect_error([&] { kvc::h2o_compress({in, in}, {2, 3}, {}, {short_att}); }, {"1 LayerInputs for 2 layers"});
  // Skipped layers need nothing, nor do empty ones.
  expect_unchanged(kvc::h2o_compress({in}, {2, 3}, {0})[0], in);
  const at::Tensor empty = in.first.narrow(2, 0, 0);
  EXPECT_FALSE(kvc::make_compressor("tova(cache_size=4)")->select(kvc::LayerView{empty, 0, 1}).has_value());
  EXPECT_EQ(kvc::kept_tokens(*kvc::make_compressor("snapkv(keep_size=8)"), 0, 1, 0), 0);
}

TEST_P(Policies, HugeBudgetsKeepEverythingWithoutOverflow) {
  // Budgets are summed saturating: "within budget" for any representable value.
  constexpr int64_t big = std::numeric_limits<int64_t>::max();
  auto in = mixed(12);
  const Norms att(2, std::vector<std::vector<double>>(2, std::vector<double>(12, 0.5)));
  for (const std::string spec : {"h2o(heavy_hitter_size=" + std::to_string(big) + ", recent_size=" + std::to_string(big) + ")",
                                 "h2o_attention(start_size=" + std::to_string(big) + ", heavy_hitter_size=1, recent_size=" +
                                     std::to_string(big) + ")",
                                 "streaming_llm(start_size=4, recent_size=" + std::to_string(big) + ")",
                                 "h2o_l2(start_size=" + std::to_string(big) + ", heavy_hitter_size=" + std::to_string(big) + ")",
                                 "tova(cache_size=" + std::to_string(big) + ")",
                                 "snapkv(observation_window=" + std::to_string(big) + ", keep_size=4)"}) {
    SCOPED_TRACE(spec);
    auto c = kvc::make_compressor(spec);
    kvc::LayerInputs li = with_queries(in, 1, 1.0);
    li.attention = per_slot(att, dev());
    expect_unchanged(c->compress({in}, {li})[0], in);
  }
}

TEST(PyramidBudgets, ExtremeValuesSaturateInsteadOfOverflowing) {
  using P = kvc::policies::PyramidKV;
  constexpr int64_t big = std::numeric_limits<int64_t>::max();
  kvc::PyramidKVOptions o;
  o.base_size = big;  // 2^63 - 1 as a double is 2^63: past int64, so it saturates
  EXPECT_EQ(P::layer_budget(o, 0, 32), big);
  EXPECT_EQ(P::layer_budget(o, 1, 32), 8301034833169298432);  // Python: int(9223372036854775807 * 0.9)
  o.base_size = 512;
  o.layer_decay = 1e300;  // 512 * 1e300^i overflows double to inf at i = 2
  EXPECT_EQ(P::layer_budget(o, 1, 32), big);
  EXPECT_EQ(P::layer_budget(o, 2, 32), big);
  o.layer_decay = 0.9;
  o.profile = kvc::PyramidProfile::linear;
  o.base_size = big;
  o.min_size = 2;
  EXPECT_EQ(P::layer_budget(o, 31, 32), 2);  // i * (base - min) would overflow int64
  EXPECT_GT(P::layer_budget(o, 16, 32), int64_t{1} << 61);
  // Through the registry on a 3-layer cache: nothing is cut.
  auto c = kvc::make_compressor("pyramid_kv(base_size=" + std::to_string(big) + ")");
  kvc::KVCache kv(3, layer_from_norms({{ramp(20, true)}}));
  const auto out = c->compress(kv);
  for (size_t l = 0; l < 3; ++l) EXPECT_TRUE(out[l].first.is_same(kv[l].first)) << "layer " << l;
}

// --- per-head budgets (AdaKV): hidden slots in a dense cache ------------------------------------

namespace {

// Per (row, head): the kept positions that are visible and those that are hidden.
struct HeadSplit {
  std::vector<std::vector<std::vector<int64_t>>> visible, hidden;
};

HeadSplit split_of(const kvc::Selection& s, int64_t batch, int64_t heads) {
  const at::Tensor pos = s.positions(batch, heads, at::kCPU).cpu();
  const at::Tensor hid = s.hidden().cpu();
  HeadSplit out;
  out.visible.assign(batch, std::vector<std::vector<int64_t>>(heads));
  out.hidden.assign(batch, std::vector<std::vector<int64_t>>(heads));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < pos.size(2); ++j)
        (hid[b][h][j].item<bool>() ? out.hidden : out.visible)[b][h].push_back(pos[b][h][j].item<int64_t>());
  return out;
}

kvc::LayerView adakv_view(const at::Tensor& keys, const at::Tensor& attention, at::Tensor hidden = {}) {
  kvc::LayerView v{keys, 0, 1, {}, attention};
  v.hidden = hidden.defined() ? hidden : at::zeros(attention.sizes(), attention.options().dtype(at::kBool));
  return v;
}

}  // namespace

TEST_P(Policies, AdaKVGivesBudgetToTheHeadsThatNeedIt) {
  // One row, two heads, seq 10: h2o with 2 heavy hitters + 2 recent = 4 per head, 8 in all.
  // Head 0's attention is concentrated on four middle tokens, head 1's spread thin.
  auto in = layer({{ramp(10, true), ramp(10, false)}});
  const at::Tensor att = per_slot({{{0.875, 0.75, 0.625, 0.5, 0, 0, 0, 0, 0, 0},
                                    {0.0625, 0, 0.125, 0, 0, 0.25, 0, 0, 0, 0}}}, dev());
  auto run = [&](const std::string& extra, at::Tensor hidden = {}) {
    auto c = kvc::make_compressor("adakv_h2o(heavy_hitter_size=2, recent_size=2" + extra + ")");
    std::optional<kvc::Selection> s = c->select(adakv_view(in.first, att, hidden));
    EXPECT_TRUE(s.has_value());
    EXPECT_TRUE(s->hidden().defined());
    return split_of(*s, 1, 2);
  };
  // No safeguard: the recent windows (always kept) and head 0's four best; every head holds
  // min(10, 2 * 4) = 8 slots, filled with its next-best tokens, hidden.
  HeadSplit a = run(", alpha_safeguard=0");
  EXPECT_EQ(a.visible[0][0], (std::vector<int64_t>{0, 1, 2, 3, 8, 9}));
  EXPECT_EQ(a.visible[0][1], (std::vector<int64_t>{8, 9}));
  EXPECT_EQ(a.hidden[0][0], (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(a.hidden[0][1], (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  // Safeguard 0.75: each head's int(0.75 * 4) = 3 best first (head 1: 8, 9 and 5).
  HeadSplit b = run(", alpha_safeguard=0.75");
  EXPECT_EQ(b.visible[0][0], (std::vector<int64_t>{0, 1, 2, 8, 9}));
  EXPECT_EQ(b.visible[0][1], (std::vector<int64_t>{5, 8, 9}));
  // Safeguard 1: every head its own 4, which is h2o itself.
  HeadSplit c = run(", alpha_safeguard=1");
  EXPECT_EQ(c.visible[0][0], (std::vector<int64_t>{0, 1, 8, 9}));
  EXPECT_EQ(c.visible[0][1], (std::vector<int64_t>{2, 5, 8, 9}));
  // head_cap 1.25: no head keeps more than ceil(5) tokens, and 5 slots per head.
  HeadSplit d = run(", alpha_safeguard=0, head_cap=1.25");
  EXPECT_EQ(d.visible[0][0], (std::vector<int64_t>{0, 1, 2, 8, 9}));
  EXPECT_TRUE(d.hidden[0][0].empty());
  EXPECT_EQ(d.visible[0][1], (std::vector<int64_t>{5, 8, 9}));
  EXPECT_EQ(d.hidden[0][1], (std::vector<int64_t>{0, 2}));
  // A slot hidden before stays evicted, however high its score: head 0's position 0.
  at::Tensor was = at::zeros({1, 2, 10}, at::TensorOptions().dtype(at::kBool).device(dev()));
  was.select(1, 0).select(1, 0).fill_(true);
  HeadSplit e = run(", alpha_safeguard=0", was);
  EXPECT_EQ(e.visible[0][0], (std::vector<int64_t>{1, 2, 3, 8, 9}));
  EXPECT_EQ(e.visible[0][1], (std::vector<int64_t>{5, 8, 9}));
  // Sizes depend on lengths only: what a fixed-capacity cache allocates.
  auto c8 = kvc::make_compressor("adakv_h2o(heavy_hitter_size=2, recent_size=2)");
  EXPECT_EQ(kvc::kept_tokens(*c8, 0, 1, 10), 8);
  EXPECT_EQ(kvc::kept_tokens(*c8, 0, 1, 4), 4);
  EXPECT_EQ(kvc::kept_tokens(*kvc::make_compressor("adakv_h2o(heavy_hitter_size=2, recent_size=2, head_cap=100)"), 0, 1, 10), 10);
}

TEST_P(Policies, AdaKVBreaksCrossHeadTiesByEarlierHeadThenEarlierSlot) {
  // Three heads whose every middle slot has the same attention: H2O's recent 2 per head are
  // always kept, and the rest of the layer's 3 * 4 budget goes by the documented rule (ties:
  // the earlier head, then the earlier slot), up to each head's cap of ceil(2 * 4) = 8 slots.
  const int64_t seq = 10;
  auto in = layer({{ramp(seq, true), ramp(seq, false), ramp(seq, true)}});
  const at::Tensor att = at::full({1, 3, seq}, 0.5, at::TensorOptions().device(dev()));
  auto run = [&](const std::string& extra) {
    auto c = kvc::make_compressor("adakv_h2o(heavy_hitter_size=2, recent_size=2" + extra + ")");
    std::optional<kvc::Selection> s = c->select(adakv_view(in.first, att));
    EXPECT_TRUE(s.has_value());
    return split_of(*s, 1, 3);
  };
  using V = std::vector<int64_t>;
  // No safeguard: the 6 tied slots left all go to head 0, which is capped at 8 slots (its
  // slots 6 and 7 rank past the cap); heads 1 and 2 keep their recent 2, the earliest 6 hidden.
  HeadSplit a = run(", alpha_safeguard=0");
  EXPECT_EQ(a.visible[0][0], (V{0, 1, 2, 3, 4, 5, 8, 9}));
  EXPECT_TRUE(a.hidden[0][0].empty());
  for (int64_t h : {1, 2}) {
    EXPECT_EQ(a.visible[0][h], (V{8, 9})) << "head " << h;
    EXPECT_EQ(a.hidden[0][h], (V{0, 1, 2, 3, 4, 5})) << "head " << h;
  }
  // Safeguard int(0.75 * 4) = 3: each head first gets its earliest tied slot, then the 3 left
  // go to head 0, earliest first.
  HeadSplit b = run(", alpha_safeguard=0.75");
  EXPECT_EQ(b.visible[0][0], (V{0, 1, 2, 3, 8, 9}));
  EXPECT_EQ(b.hidden[0][0], (V{4, 5}));
  for (int64_t h : {1, 2}) {
    EXPECT_EQ(b.visible[0][h], (V{0, 8, 9})) << "head " << h;
    EXPECT_EQ(b.hidden[0][h], (V{1, 2, 3, 4, 5})) << "head " << h;
  }
  // A tie between heads broken the other way by one slot's score: head 2's slot 7 outranks every
  // tied slot, so head 0 keeps one fewer.
  at::Tensor att2 = att.clone();
  att2.select(1, 2).select(1, 7).fill_(0.75);
  auto c = kvc::make_compressor("adakv_h2o(heavy_hitter_size=2, recent_size=2, alpha_safeguard=0)");
  HeadSplit d = split_of(*c->select(adakv_view(in.first, att2)), 1, 3);
  EXPECT_EQ(d.visible[0][0], (V{0, 1, 2, 3, 4, 8, 9}));
  EXPECT_EQ(d.visible[0][1], (V{8, 9}));
  EXPECT_EQ(d.visible[0][2], (V{7, 8, 9}));
}

TEST_P(Policies, AdaKVKeepsTheLayersBudgetAndWithFullSafeguardEqualsItsPolicy) {
  // Random scores, 2 rows x 4 heads x 40 slots: for every safeguard the visible tokens number
  // heads * B per row, each head keeps at least int(alpha * B) and at most its slots; with
  // alpha 1 every head keeps exactly what the wrapped policy keeps.
  at::manual_seed(11);
  const int64_t b = 2, h = 4, seq = 40;
  const at::Tensor keys = at::randn({b, h, seq, 4}, at::TensorOptions().device(dev()));
  const at::Tensor att = at::rand({b, h, seq}, at::TensorOptions().device(dev()));
  kvc::LayerInputs li;
  li.attention = att;
  li.queries = at::randn({b, h, 4, 4}, at::TensorOptions().device(dev()));
  struct Case { std::string wrapped, base; int64_t per_head; };
  for (const Case& k : {Case{"adakv_h2o(heavy_hitter_size=6, recent_size=4", "h2o(heavy_hitter_size=6, recent_size=4)", 10},
                        Case{"adakv_snapkv(observation_window=4, keep_size=12, pooling_kernel=3",
                             "snapkv(observation_window=4, keep_size=12, pooling_kernel=3)", 12}}) {
    for (const double alpha : {0.0, 0.2, 0.5, 1.0}) {
      SCOPED_TRACE(k.wrapped + " alpha " + std::to_string(alpha));
      auto c = kvc::make_compressor(k.wrapped + ", alpha_safeguard=" + std::to_string(alpha) + ")");
      kvc::LayerView v = adakv_view(keys, att);
      v.queries = li.queries;
      v.query_positions = at::arange(seq - 4, seq, at::kLong);
      v.key_positions = at::arange(seq, at::TensorOptions().dtype(at::kLong).device(dev())).expand({b, h, seq});
      std::optional<kvc::Selection> s = c->select(v);
      ASSERT_TRUE(s.has_value());
      EXPECT_EQ(s->kept(), 2 * k.per_head);
      const at::Tensor pos = s->positions(b, h, dev());
      EXPECT_TRUE(pos.diff(1, -1).gt(0).all().item<bool>()) << "positions ascending and distinct";
      const at::Tensor visible = s->hidden().logical_not().sum(-1).cpu();  // [b, h]
      for (int64_t r = 0; r < b; ++r) {
        EXPECT_EQ(visible[r].sum().item<int64_t>(), h * k.per_head);
        EXPECT_GE(visible[r].min().item<int64_t>(), static_cast<int64_t>(alpha * k.per_head));
      }
      if (alpha == 1.0) {
        std::optional<kvc::Selection> base = kvc::make_compressor(k.base)->select(v);
        ASSERT_TRUE(base.has_value());
        const HeadSplit got = split_of(*s, b, h);
        const at::Tensor want = base->positions(b, h, dev()).cpu();
        for (int64_t r = 0; r < b; ++r)
          for (int64_t j = 0; j < h; ++j) {
            std::vector<int64_t> w(want[r][j].data_ptr<int64_t>(), want[r][j].data_ptr<int64_t>() + want.size(2));
            EXPECT_EQ(got.visible[r][j], w) << "row " << r << " head " << j;
          }
      }
    }
  }
}

TEST_P(Policies, AdaKVIsRefusedWhereHiddenSlotsCannotBeKept) {
  auto in = mixed(12);
  auto c = kvc::make_compressor("adakv_h2o(heavy_hitter_size=2, recent_size=2)");
  EXPECT_TRUE(c->needs().hides);
  EXPECT_EQ(c->spec(), "adakv_h2o(heavy_hitter_size=2, recent_size=2, alpha_safeguard=0.2, head_cap=2.0, skip_layers=[])");
  expect_error([&] { c->compress({in}, {with_attention(Norms(2, std::vector<std::vector<double>>(2, std::vector<double>(12, 0))), dev())}); },
               {"adakv_h2o(", "hiding slots", "StaticCache"});
  // select() without the hidden mask: named.
  kvc::LayerView v{in.first, 0, 1, {}, at::zeros({2, 2, 12}, at::TensorOptions().device(dev()))};
  expect_error([&] { c->select(v); }, {"adakv_h2o: layer 0", "the slots it hid before", "not provided"});
  v.hidden = at::zeros({2, 2, 12}, at::TensorOptions().device(dev()));
  expect_error([&] { c->select(v); }, {"hidden must be bool"});
  expect_error([] { kvc::make_compressor("adakv_snapkv(head_cap=0.5)"); }, {"adakv_snapkv", "head_cap", "[1.0, "});
  expect_error([] { kvc::make_compressor("adakv_snapkv(alpha_safeguard=1.5)"); }, {"alpha_safeguard"});
}

namespace {
// A user's policy that hides a slot without declaring Needs::hides.
struct SneakyHider {
  struct Options {};
  static constexpr const char* name = "sneaky_hider";
  template <class O, class V>
  static void visit_params(O&, V&) {}
  static std::optional<kvc::Selection> select(const Options&, const kvc::LayerView& layer) {
    kvc::Selection s;
    s.keep_span(0, 2);
    return s.hide(at::zeros({layer.keys.size(0), layer.keys.size(1), 2}, at::kBool));
  }
};
}  // namespace

TEST(PerHeadBudgets, APolicyMustDeclareThatItHides) {
  auto in = layer_from_norms({{ramp(6, true)}});
  kvc::BasicCompressor<SneakyHider> c;
  expect_error([&] { c.select(kvc::LayerView{in.first, 0, 1}); }, {"sneaky_hider", "does not declare Needs::hides"});
}
