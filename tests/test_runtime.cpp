// kvbench's runtime on the bundled model: the evaluation loop is exact, compressed runs stay at
// their budgets, the tokenizer matches SentencePiece, and bad model files are reported.
#include <kvcompress/kvcompress.hpp>
#include <kvcompress/runtime/evaluate.hpp>
#include <kvcompress/runtime/sentencepiece_bpe.hpp>

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sstream>

namespace kvc = kvcompress;
namespace rt = kvcompress::runtime;

namespace {

const std::string kData = KVC_DATA_DIR;
const std::string kModel = kData + "/pg19-neox-tiny.pt";
const std::string kBook = "pg10321_dragons_blood";

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<int64_t> bundled_tokens(size_t n) {
  std::istringstream in(slurp(kData + "/eval_tokens/" + kBook + ".ids"));
  std::string header;
  std::getline(in, header);
  std::vector<int64_t> ids;
  int64_t id;
  while (ids.size() < n && in >> id) ids.push_back(id);
  return ids;
}

rt::ContractModel& model() {
  static rt::ContractModel m = rt::ContractModel::load(kModel, at::kCPU, at::kFloat);
  return m;
}

template <class Fn>
void expect_error(Fn&& fn, const std::string& fragment) {
  try {
    fn();
    ADD_FAILURE() << "expected kvcompress::Error containing: " << fragment;
  } catch (const kvc::Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "multi-line: " << e.what();
  }
}

}  // namespace

TEST(Runtime, ModelFollowsTheContract) {
  const auto& info = model().info();
  EXPECT_EQ(info.name, "pg19-neox-tiny");
  EXPECT_EQ(info.num_layers, 6);
  EXPECT_GE(info.max_positions, 2048);
  EXPECT_FALSE(model().tokenizer_model().empty());
  EXPECT_NE(model().config_json().find("\"num_layers\""), std::string::npos);
}

TEST(Runtime, TokenByTokenNllEqualsOneFullForward) {
  const auto tokens = bundled_tokens(300);
  ASSERT_EQ(tokens.size(), 300u);
  c10::InferenceMode guard;
  at::Tensor ids = at::tensor(tokens, at::kLong).unsqueeze(0);
  auto full = model().forward(ids, at::arange(300, at::kLong).unsqueeze(0), model().empty_cache());
  at::Tensor logp = at::log_softmax(full.logits[0].to(at::kDouble), -1);  // [300, V]
  at::Tensor targets = ids[0].narrow(0, 1, 299);
  const double full_nll = -logp.narrow(0, 0, 299).gather(1, targets.unsqueeze(1)).sum().item<double>();

  rt::RunMetrics m;
  rt::evaluate_sample(model(), nullptr, tokens, m);
  EXPECT_EQ(m.scored, 299);
  EXPECT_NEAR(m.nll_sum, full_nll, 1e-4 * std::abs(full_nll));
  EXPECT_EQ(m.cache_tokens, 300);
  // A trained model: far better than the uniform distribution over the vocabulary.
  EXPECT_LT(m.ppl(), 0.1 * static_cast<double>(model().info().vocab_size));
}

TEST(Runtime, CompressedRunsKeepEveryLayerAtItsBudget) {
  const auto tokens = bundled_tokens(200);
  struct Case { const char* spec; std::vector<int64_t> budgets; };  // per layer 2..5
  const std::vector<Case> cases = {
      {"streaming_llm(start_size=4, recent_size=60, skip_layers=[0,1])", {64, 64, 64, 64}},
      {"h2o_l2(start_size=4, heavy_hitter_size=8, recent_size=52, skip_layers=[0,1])", {64, 64, 64, 64}},
      {"recent_only(window_size=64, skip_layers=[0,1])", {64, 64, 64, 64}},
      {"snapkv_lite(observation_window=4, keep_size=64, skip_layers=[0,1])", {64, 64, 64, 64}},
      // int(64 * 0.9^i) for layers 2..5: 51, 46, 41, 37.
      {"pyramid_kv(base_size=64, layer_decay=0.9, min_size=8, skip_layers=[0,1])", {51, 46, 41, 37}},
      // Compressed every step, adaptive_l2 never leaves its soft band: at seq = soft + 1 it keeps
      // max(int(seq * ratio), soft) = soft tokens, so the cache settles at soft_limit.
      {"adaptive_l2(target_size=64, soft_limit=32, hard_limit=128, skip_layers=[0,1])", {32, 32, 32, 32}},
      {"fix_size_l2(fix_kv_size=64, keep_ratio=0.5, skip_layers=[0,1])", {64, 64, 64, 64}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.spec);
    auto compressor = kvc::make_compressor(c.spec);
    rt::RunMetrics m;
    kvc::KVCache cache = rt::evaluate_sample(model(), compressor.get(), tokens, m);
    ASSERT_EQ(cache.size(), 6u);
    EXPECT_EQ(cache[0].first.size(2), 200);  // skipped layers keep everything
    EXPECT_EQ(cache[1].first.size(2), 200);
    for (size_t l = 2; l < 6; ++l) EXPECT_EQ(cache[l].first.size(2), c.budgets[l - 2]) << "layer " << l;
    EXPECT_EQ(m.cache_tokens, c.budgets[0]);
    EXPECT_TRUE(std::isfinite(m.ppl()));
  }
}

TEST(Runtime, GenerationKeepsTheCacheAtBudget) {
  const auto prompt = bundled_tokens(100);
  auto compressor = kvc::make_compressor("streaming_llm(start_size=4, recent_size=28, skip_layers=[0,1])");
  rt::RunMetrics m;
  rt::measure_generation(model(), compressor.get(), prompt, 8, m);
  EXPECT_EQ(m.gen_tokens, 8);
  EXPECT_EQ(m.gen_later_steps, 7);
  EXPECT_EQ(m.gen_cache_tokens, 32);
  EXPECT_GT(m.gen_ttft_s, 0.0);
}

TEST(Runtime, TokenizerMatchesSentencePiece) {
  // data/eval_tokens was written by Python's sentencepiece from data/eval_text.
  rt::SentencePieceBPE tokenizer(model().tokenizer_model());
  EXPECT_EQ(tokenizer.vocab_size(), model().info().vocab_size);
  const auto ids = tokenizer.encode(slurp(kData + "/eval_text/" + kBook + ".txt"));
  EXPECT_EQ(ids, bundled_tokens(1u << 30));
}

TEST(Runtime, BadModelFilesAreReported) {
  expect_error([] { rt::ContractModel::load("/nonexistent/model.pt", at::kCPU, at::kFloat); },
               "model file not found");
  const std::string corrupt = testing::TempDir() + "kvc_corrupt.pt";
  std::ofstream(corrupt) << "this is not a zip archive";
  expect_error([&] { rt::ContractModel::load(corrupt, at::kCPU, at::kFloat); }, "cannot load model");
  torch::jit::Module plain("NotAContractModel");
  plain.define("def forward(self, x):\n  return x\n");
  const std::string plain_path = testing::TempDir() + "kvc_plain.pt";
  plain.save(plain_path);
  expect_error([&] { rt::ContractModel::load(plain_path, at::kCPU, at::kFloat); },
               "missing attribute 'kvc_contract_version'");
  expect_error([] { rt::SentencePieceBPE("garbage"); }, "tokenizer model");
}

// --- the fixed-capacity runtime (model `step`, kvcompress::StaticCache) -------------------------

TEST(StaticRuntime, PeakLengthsSizeTheBuffersExactly) {
  auto c = kvc::make_compressor("streaming_llm(start_size=4, recent_size=60, skip_layers=[0,1])");
  EXPECT_EQ(rt::peak_lengths(c.get(), 4, 200, 1, kvc::Schedule::every()), (std::vector<int64_t>{200, 200, 65, 65}));
  EXPECT_EQ(rt::peak_lengths(c.get(), 4, 200, 1, kvc::Schedule::chunk(16)), (std::vector<int64_t>{200, 200, 80, 80}));
  EXPECT_EQ(rt::peak_lengths(c.get(), 4, 200, 150, kvc::Schedule::every()), (std::vector<int64_t>{200, 200, 150, 150}));
  EXPECT_EQ(rt::peak_lengths(nullptr, 2, 50, 1, kvc::Schedule::every()), (std::vector<int64_t>{50, 50}));
}

// The model's `step` attends over whole buffers with a mask, so its keys agree with the
// concatenating forward to ~1e-6, not bitwise; score-based selections can flip at near-ties
// (snapkv_lite's pooled scores, say). The bitwise guarantee is the library's: see
// Cache.EveryStepKeepsExactlyWhatTheFunctionalApiKeeps.
TEST(StaticRuntime, EveryStepScheduleMatchesTheConcatenatingLoop) {
  const auto tokens = bundled_tokens(160);
  for (const char* spec : {"h2o_l2(start_size=4, heavy_hitter_size=8, recent_size=36, skip_layers=[0,1])",
                           "streaming_llm(start_size=4, recent_size=44, skip_layers=[0,1])",
                           "pyramid_kv(base_size=48, layer_decay=0.9, min_size=8, skip_layers=[0,1])"}) {
    SCOPED_TRACE(spec);
    auto c = kvc::make_compressor(spec);
    rt::RunMetrics dynamic_m, static_m;
    const kvc::KVCache dynamic_cache = rt::evaluate_sample(model(), c.get(), tokens, dynamic_m);
    const kvc::KVCache static_cache = rt::evaluate_sample_static(model(), c.get(), tokens, static_m, {});
    EXPECT_NEAR(static_m.nll_sum, dynamic_m.nll_sum, 1e-4 * dynamic_m.nll_sum);
    EXPECT_EQ(static_m.hits, dynamic_m.hits);
    ASSERT_EQ(static_cache.size(), dynamic_cache.size());
    for (size_t l = 0; l < static_cache.size(); ++l) {
      ASSERT_EQ(static_cache[l].first.sizes(), dynamic_cache[l].first.sizes()) << "layer " << l;
      EXPECT_TRUE(at::allclose(static_cache[l].first, dynamic_cache[l].first, 1e-4, 1e-4)) << "layer " << l;
      EXPECT_TRUE(at::allclose(static_cache[l].second, dynamic_cache[l].second, 1e-4, 1e-4)) << "layer " << l;
    }
  }
}

TEST(StaticRuntime, ChunkedScheduleStaysWithinBudgetPlusSlack) {
  const auto tokens = bundled_tokens(200);
  auto c = kvc::make_compressor("streaming_llm(start_size=4, recent_size=60, skip_layers=[0,1])");
  rt::StaticOptions so;
  so.schedule = kvc::Schedule::chunk(16);
  rt::RunMetrics m;
  const kvc::KVCache cache = rt::evaluate_sample_static(model(), c.get(), tokens, m, so);
  EXPECT_EQ(cache[0].first.size(2), 200);
  EXPECT_GE(cache[2].first.size(2), 64);
  EXPECT_LE(cache[2].first.size(2), 80);
  EXPECT_LT(m.ppl(), 0.1 * static_cast<double>(model().info().vocab_size));
}

TEST(StaticRuntime, BatchedGenerationKeepsTheBudget) {
  const auto prompt = bundled_tokens(100);
  auto c = kvc::make_compressor("recent_only(window_size=40, skip_layers=[0,1])");
  rt::RunMetrics m;
  rt::measure_generation_static(model(), c.get(), prompt, 6, 3, m, {});
  EXPECT_EQ(m.gen_batch, 3);
  EXPECT_EQ(m.gen_later_steps, 5);
  EXPECT_EQ(m.gen_cache_tokens, 40);
  EXPECT_GT(m.gen_tok_s(), 0.0);
}

TEST(StaticRuntime, ChunkedPrefillFillsTheSameCache) {
  const auto prompt = bundled_tokens(23);
  const at::Tensor ids = at::tensor(prompt, at::kLong).unsqueeze(0);
  rt::StaticDecoder whole(model(), 1, {32}, false), chunked(model(), 1, {32}, false);
  const at::Tensor a = whole.prefill(ids, 0, 0);
  const at::Tensor b = chunked.prefill(ids, 0, 5);  // 5 + 5 + 5 + 5 + 3 tokens
  ASSERT_EQ(b.size(1), 3);
  EXPECT_TRUE(at::allclose(a.select(1, -1), b.select(1, -1), 1e-4, 1e-4));
  for (int64_t l = 0; l < model().info().num_layers; ++l) {
    EXPECT_EQ(chunked.cache().length(l), 23);
    EXPECT_TRUE(at::allclose(whole.cache().view()[l].first, chunked.cache().view()[l].first, 1e-4, 1e-4));
    EXPECT_TRUE(at::allclose(whole.cache().view()[l].second, chunked.cache().view()[l].second, 1e-4, 1e-4));
    EXPECT_TRUE(at::equal(whole.cache().positions(l), chunked.cache().positions(l)));
  }
  expect_error([&] { chunked.prefill(ids, 23, -1); }, "chunk must be >= 0");
}

TEST(StaticRuntime, CudaGraphsOnCpuAreRefused) {
  expect_error([] { rt::StaticDecoder(model(), 1, {8}, /*cuda_graph=*/true); }, "--cuda-graph needs --device cuda");
}

// --- the `cache` position rule ------------------------------------------------------------------

TEST(Positions, ShiftingAllPositionsIsOneRotationOfEveryCachedKey) {
  // RoPE attention sees only distances: the same tokens fed 7 positions later give every layer's
  // keys rotated by 7 more, which rerotate_keys reproduces.
  const auto toks = bundled_tokens(10);
  c10::InferenceMode guard;
  const at::Tensor ids = at::tensor(toks, at::kLong).unsqueeze(0);
  auto a = model().forward(ids, at::arange(10, at::kLong).unsqueeze(0), model().empty_cache());
  auto b = model().forward(ids, at::arange(7, 17, at::kLong).unsqueeze(0), model().empty_cache());
  EXPECT_TRUE(at::allclose(a.logits, b.logits, 1e-3, 1e-3));
  for (size_t l = 0; l < a.cache.size(); ++l) {
    at::Tensor k = a.cache[l].first.clone();
    kvc::rerotate_keys(k, at::full({1, model().info().num_heads, 10}, 7, at::kLong), model().info().rotary_ndims,
                       model().info().rotary_base);
    EXPECT_TRUE(at::allclose(k, b.cache[l].first, 1e-3, 1e-4)) << "layer " << l;
  }
}

TEST(Positions, CacheRuleChangesNothingForARecentWindow) {
  // A window of the last k tokens already sits at slot distances: every delta is 0.
  const auto tokens = bundled_tokens(150);
  auto c = kvc::make_compressor("recent_only(window_size=40)");
  rt::RunMetrics original, cache;
  rt::evaluate_sample(model(), c.get(), tokens, original);
  rt::evaluate_sample(model(), c.get(), tokens, cache, {0, 1}, nullptr, kvc::PositionRule::cache);
  EXPECT_EQ(cache.nll_sum, original.nll_sum);
  auto sinks = kvc::make_compressor("streaming_llm(start_size=4, recent_size=36)");
  rt::RunMetrics s_original, s_cache;
  rt::evaluate_sample(model(), sinks.get(), tokens, s_original);
  rt::evaluate_sample(model(), sinks.get(), tokens, s_cache, {0, 1}, nullptr, kvc::PositionRule::cache);
  EXPECT_NE(s_cache.nll_sum, s_original.nll_sum);  // the sinks move next to the window
  EXPECT_LT(s_cache.ppl(), 0.1 * static_cast<double>(model().info().vocab_size));
}
