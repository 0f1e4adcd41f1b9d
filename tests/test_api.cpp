// The registry, spec strings, the three ways in, and every bad input named in the contract.
#include "test_support.hpp"

using namespace kvtest;
namespace kvc = kvcompress;

namespace {

kvc::KVCache small_cache(int64_t layers = 3, int64_t seq = 12) {
  kvc::KVCache kv;
  for (int64_t i = 0; i < layers; ++i)
    kv.push_back(layer_from_norms({{ramp(seq, i % 2 == 0), ramp(seq, i % 2 == 1)}}));
  return kv;
}

}  // namespace

TEST(Registry, ListsTheEightCanonicalMethods) {
  const std::vector<std::string> expected = {"adaptive_l2", "fix_size_l2", "h2o_l2", "l2",
                                             "pyramid_kv", "recent_only", "snapkv_lite",
                                             "streaming_llm"};
  auto methods = kvc::list_methods();
  for (const auto& name : expected)
    EXPECT_NE(std::find(methods.begin(), methods.end(), name), methods.end()) << name;
}

TEST(Registry, CanonicalSpecsSpellOutEveryParameter) {
  EXPECT_EQ(kvc::make_compressor("streaming_llm")->spec(),
            "streaming_llm(start_size=4, recent_size=508, skip_layers=[])");
  EXPECT_EQ(kvc::make_compressor("l2")->spec(), "l2(keep_ratio=1.0, prune_after=1000, skip_layers=[0,1])");
  EXPECT_EQ(kvc::make_compressor("fix_size_l2")->spec(),
            "fix_size_l2(fix_kv_size=1024, keep_ratio=0.0, strategy=keep_low, skip_layers=[0,1])");
  EXPECT_EQ(kvc::make_compressor("h2o_l2")->spec(),
            "h2o_l2(start_size=4, heavy_hitter_size=64, recent_size=444, skip_layers=[])");
  EXPECT_EQ(kvc::make_compressor("snapkv_lite")->spec(),
            "snapkv_lite(observation_window=32, keep_size=512, pooling_kernel=5, skip_layers=[])");
  EXPECT_EQ(kvc::make_compressor("pyramid_kv")->spec(),
            "pyramid_kv(base_size=512, layer_decay=0.9, min_size=64, profile=exponential, skip_layers=[])");
  EXPECT_EQ(kvc::make_compressor("adaptive_l2")->spec(),
            "adaptive_l2(target_size=512, soft_limit=256, hard_limit=1024, keep_ratio_min=0.3, "
            "keep_ratio_max=0.9, skip_layers=[])");
  EXPECT_EQ(kvc::make_compressor("recent_only")->spec(), "recent_only(window_size=512, skip_layers=[0,1])");
}

TEST(Registry, ParsesNumbersWordsListsAndWhitespace) {
  auto c = kvc::make_compressor("  fix_size_l2 ( fix_kv_size = 512 , keep_ratio=0.5,strategy= keep_high ,"
                                " skip_layers = [ 0 , 3 ] ) ");
  EXPECT_EQ(c->name(), "fix_size_l2");
  EXPECT_EQ(c->spec(), "fix_size_l2(fix_kv_size=512, keep_ratio=0.5, strategy=keep_high, skip_layers=[0,3])");
  EXPECT_EQ(kvc::make_compressor("l2(skip_layers=[])")->spec(),
            "l2(keep_ratio=1.0, prune_after=1000, skip_layers=[])");
  EXPECT_EQ(kvc::make_compressor("l2()")->spec(), kvc::make_compressor("l2")->spec());
  EXPECT_EQ(kvc::make_compressor("fix_size_l2(strategy='keep_high', keep_ratio=.5)")->spec(),
            kvc::make_compressor("fix_size_l2(strategy=\"keep_high\", keep_ratio=0.5)")->spec());
  EXPECT_EQ(kvc::make_compressor("l2(keep_ratio=1)")->spec(), kvc::make_compressor("l2")->spec());
  // A canonical spec reads back to itself.
  for (const auto& name : kvc::list_methods()) {
    auto spec = kvc::make_compressor(name)->spec();
    EXPECT_EQ(kvc::make_compressor(spec)->spec(), spec);
  }
}

TEST(Registry, AliasL2Compress) {
  auto c = kvc::make_compressor("l2_compress(keep_ratio=0.5)");
  EXPECT_EQ(c->name(), "l2");
  EXPECT_EQ(c->spec(), "l2(keep_ratio=0.5, prune_after=1000, skip_layers=[0,1])");
}

TEST(Registry, RegistryMatchesFunctionalAndTemplatedWays) {
  auto kv = small_cache(3, 40);
  auto via_registry = kvc::make_compressor("h2o_l2(start_size=2, heavy_hitter_size=5, recent_size=7)")->compress(kv);
  auto via_function = kvc::h2o_l2_compress(kv, {2, 5, 7}, {});
  kvc::BasicCompressor<kvc::policies::H2OL2> typed({2, 5, 7}, {});
  auto via_template = typed.compress(kv);
  for (size_t i = 0; i < kv.size(); ++i) {
    EXPECT_TRUE(at::equal(via_registry[i].first, via_function[i].first));
    EXPECT_TRUE(at::equal(via_registry[i].second, via_template[i].second));
  }
}

// A user's own policy: keep every other token.
struct EveryOther {
  struct Options {
    int64_t phase = 0;
  };
  static constexpr const char* name = "test_every_other";
  template <class O, class V>
  static void visit_params(O& o, V& v) {
    v.integer("phase", o.phase, 0, 1);
  }
  static std::optional<kvc::Selection> select(const Options& o, const kvc::LayerView& layer) {
    kvc::Selection s;
    for (int64_t t = o.phase; t < layer.seq(); t += 2) s.keep_span(t, 1);
    return s;
  }
};

TEST(Registry, UsersCanRegisterTheirOwnPolicy) {
  kvc::register_policy<EveryOther>({"test_alternate"});
  auto methods = kvc::list_methods();
  EXPECT_NE(std::find(methods.begin(), methods.end(), "test_every_other"), methods.end());
  auto c = kvc::make_compressor("test_alternate(phase=1)");
  EXPECT_EQ(c->spec(), "test_every_other(phase=1, skip_layers=[])");
  auto in = layer_from_norms({{ramp(6, true)}});
  expect_kept(c->compress({in})[0], in, {{{1, 3, 5}}});
  expect_error([] { kvc::register_policy<EveryOther>(); }, {"already registered", "test_every_other"});
  expect_error([] { kvc::make_compressor("test_every_other(phase=2)"); }, {"phase", "[0, 1]", "2"});
}

TEST(Registry, SelectionReportsKeptPositions) {
  auto kv = small_cache(1, 20);
  auto c = kvc::make_compressor("h2o_l2(start_size=2, heavy_hitter_size=3, recent_size=4)");
  auto sel = c->select(kvc::LayerView{kv[0].first, 0, 1});
  ASSERT_TRUE(sel.has_value());
  EXPECT_EQ(sel->kept(), 9);
  at::Tensor pos = sel->positions(1, 2, at::kCPU);
  // Head 0 rising norms: middle [2, 16) keeps 2, 3, 4; head 1 falling: 13, 14, 15.
  EXPECT_EQ(std::vector<int64_t>(pos[0][0].data_ptr<int64_t>(), pos[0][0].data_ptr<int64_t>() + 9),
            (std::vector<int64_t>{0, 1, 2, 3, 4, 16, 17, 18, 19}));
  EXPECT_EQ(std::vector<int64_t>(pos[0][1].data_ptr<int64_t>(), pos[0][1].data_ptr<int64_t>() + 9),
            (std::vector<int64_t>{0, 1, 13, 14, 15, 16, 17, 18, 19}));
  EXPECT_FALSE(c->select(kvc::LayerView{kv[0].first.narrow(2, 0, 9), 0, 1}).has_value());
}

// --- bad input ---------------------------------------------------------------------------------

TEST(Errors, UnknownMethodListsKnownOnes) {
  expect_error([] { kvc::make_compressor("snapkv_heavy"); }, {"unknown method 'snapkv_heavy'", "snapkv_lite", "h2o_l2", "tova"});
}

TEST(Errors, UnprintableBytesInSpecsAreShownEscapedNeverCut) {
  const std::string nul_method("snap\0kv", 7);
  try {
    kvc::make_compressor(nul_method);
    ADD_FAILURE() << "expected an error";
  } catch (const kvc::Error& e) {
    // The message is one C string: a raw NUL would end it before the list of methods.
    EXPECT_NE(std::string(e.what()).find("'snap\\x00kv'"), std::string::npos) << e.what();
  }
  expect_error([] { kvc::make_compressor("streaming_llm(start_size='4\x01\x7f')"); },
               {"start_size", "'4\\x01\\x7f'"});
  expect_error([] { kvc::make_compressor(std::string("streaming_llm('a\tb'=1)")); },
               {"unknown parameter 'a\\x09b'", "valid parameters"});
  expect_error([] { kvc::make_compressor(std::string("l2(\x02") ); }, {"bad method spec 'l2(\\x02'"});
}

TEST(Errors, UnknownParameterListsValidOnes) {
  expect_error([] { kvc::make_compressor("streaming_llm(window=3)"); },
               {"unknown parameter 'window'", "start_size, recent_size, skip_layers"});
}

TEST(Errors, IllTypedValues) {
  expect_error([] { kvc::make_compressor("streaming_llm(start_size=abc)"); }, {"start_size", "integer", "abc"});
  expect_error([] { kvc::make_compressor("streaming_llm(start_size=4.5)"); }, {"start_size", "integer"});
  expect_error([] { kvc::make_compressor("l2(keep_ratio=half)"); }, {"keep_ratio", "number"});
  expect_error([] { kvc::make_compressor("l2(keep_ratio=[1])"); }, {"keep_ratio", "number"});
  expect_error([] { kvc::make_compressor("fix_size_l2(strategy=low)"); }, {"strategy", "keep_low, keep_high, random"});
  expect_error([] { kvc::make_compressor("l2(skip_layers=0)"); }, {"skip_layers", "list"});
  expect_error([] { kvc::make_compressor("l2(skip_layers=[a])"); }, {"skip_layers", "integers"});
  expect_error([] { kvc::make_compressor("pyramid_kv(profile=cubic)"); }, {"profile", "exponential"});
}

TEST(Errors, OutOfRangeValues) {
  expect_error([] { kvc::make_compressor("l2(keep_ratio=0)"); }, {"l2", "keep_ratio", "(0.0, 1.0]"});
  expect_error([] { kvc::make_compressor("l2(keep_ratio=1.5)"); }, {"keep_ratio", "1.5"});
  expect_error([] { kvc::make_compressor("fix_size_l2(keep_ratio=1.5)"); }, {"keep_ratio", "[0.0, 1.0]"});
  EXPECT_NO_THROW(kvc::make_compressor("fix_size_l2(keep_ratio=0)"));
  EXPECT_NO_THROW(kvc::make_compressor("fix_size_l2(keep_ratio=1)"));
  expect_error([] { kvc::make_compressor("streaming_llm(recent_size=0)"); }, {"recent_size", ">= 1", "0"});
  expect_error([] { kvc::make_compressor("recent_only(window_size=0)"); }, {"window_size"});
  expect_error([] { kvc::make_compressor("h2o_l2(recent_size=0)"); }, {"recent_size"});
  expect_error([] { kvc::make_compressor("snapkv_lite(observation_window=0)"); }, {"observation_window"});
  expect_error([] { kvc::make_compressor("fix_size_l2(fix_kv_size=0)"); }, {"fix_kv_size"});
  expect_error([] { kvc::make_compressor("pyramid_kv(min_size=1)"); }, {"min_size"});
  expect_error([] { kvc::make_compressor("adaptive_l2(soft_limit=4)"); }, {"soft_limit"});
  expect_error([] { kvc::make_compressor("streaming_llm(start_size=-1)"); }, {"start_size"});
  expect_error([] { kvc::make_compressor("l2(skip_layers=[0,-1])"); }, {"skip_layers", "-1"});
  // Typed options are checked the same way.
  expect_error([] { kvc::streaming_llm_compress({}, {4, 0}, {}); }, {"recent_size"});
  // Degenerate but valid rules of the seed are accepted.
  EXPECT_NO_THROW(kvc::make_compressor("snapkv_lite(observation_window=64, keep_size=32, pooling_kernel=4)"));
  EXPECT_NO_THROW(kvc::make_compressor("h2o_l2(start_size=0, heavy_hitter_size=100000, recent_size=1)"));
}

TEST(Errors, MalformedSpecs) {
  expect_error([] { kvc::make_compressor(""); }, {"expected a method name"});
  expect_error([] { kvc::make_compressor("l2(keep_ratio=0.5"); }, {"expected ')'"});
  expect_error([] { kvc::make_compressor("l2(keep_ratio)"); }, {"expected '='"});
  expect_error([] { kvc::make_compressor("l2(keep_ratio=0.5) x"); }, {"unexpected text"});
  expect_error([] { kvc::make_compressor("l2(keep_ratio=0.5, keep_ratio=0.6)"); }, {"given twice"});
  expect_error([] { kvc::make_compressor("l2(skip_layers=[0,1)"); }, {"expected ']'"});
  expect_error([] { kvc::make_compressor("fix_size_l2(strategy='keep_low)"); }, {"unterminated quote"});
}

TEST(Errors, BadTensors) {
  auto c = kvc::make_compressor("streaming_llm(start_size=1, recent_size=2)");
  auto good = layer_from_norms({{ramp(6, true)}});
  expect_error([&] { c->compress({{good.first, good.second.narrow(2, 0, 5)}}); },
               {"layer 0", "same shape", "[1, 1, 6, 4]", "[1, 1, 5, 4]"});
  expect_error([&] { c->compress({{good.first[0], good.second[0]}}); }, {"rank 4", "[1, 6, 4]"});
  expect_error([&] { c->compress({{good.first.to(at::kInt), good.second.to(at::kInt)}}); }, {"Int"});
  expect_error([&] { c->compress({{good.first.to(at::kLong), good.second.to(at::kLong)}}); }, {"Long"});
  expect_error([&] { c->compress({{good.first, good.second.to(at::kDouble)}}); }, {"same dtype"});
  expect_error([&] { c->compress({{good.first, at::Tensor()}}); }, {"undefined"});
  auto two_heads = layer_from_norms({{ramp(6, true), ramp(6, true)}});
  expect_error([&] { c->compress({good, two_heads}); }, {"layer 1", "heads 2", "layer 0"});
  auto two_rows = layer_from_norms({{ramp(6, true)}, {ramp(6, true)}});
  expect_error([&] { c->compress({good, two_rows}); }, {"layer 1", "batch 2"});
  expect_error([&] { kvc::recent_only_compress({good, good, two_rows}); }, {"recent_only", "layer 2"});
  if (at::hasCUDA()) {
    auto on_gpu = layer_from_norms({{ramp(6, true)}}, 4, at::kFloat, at::Device(at::kCUDA, 0));
    expect_error([&] { c->compress({good, on_gpu}); }, {"layer 1", "cuda"});
    expect_error([&] { c->compress({{good.first, on_gpu.second}}); }, {"same device"});
  }
}

TEST(Errors, EmptyCacheIsFine) {
  EXPECT_TRUE(kvc::make_compressor("l2")->compress({}).empty());
}

// Every parameter of every registered method at every extreme value: refused with
// kvcompress::Error naming the parameter, or accepted and then compressing a cache (with the
// score inputs it needs) into kept positions inside the layer -- never another exception.
TEST(Errors, EveryParameterAtItsExtremes) {
  const std::vector<std::string> extremes = {"9223372036854775807", "-9223372036854775808", "9223372036854775808",
                                             "-1", "0", "1", "1e308", "-1e308", "1e-308", "nan", "inf", "-inf",
                                             "0.5", "[9223372036854775807]", "[-1]", "[]"};
  int accepted = 0, refused = 0;
  for (const std::string& method : kvc::list_methods()) {
    const kvc::ParsedSpec canonical = kvc::parse_spec(kvc::make_compressor(method)->spec());
    for (const auto& arg : canonical.args) {
      for (const std::string& value : extremes) {
        const std::string spec = method + "(" + arg.first + "=" + value + ")";
        SCOPED_TRACE(spec);
        std::unique_ptr<kvc::Compressor> c;
        try {
          c = kvc::make_compressor(spec);
        } catch (const kvc::Error& e) {
          ++refused;
          EXPECT_NE(std::string(e.what()).find(arg.first), std::string::npos) << e.what();
          continue;
        }
        ++accepted;
        kvc::StaticCache cache(3, 1, 2, 4, {20}, at::TensorOptions().dtype(at::kFloat));
        cache.track_attention();
        kvc::RecentQueries recent;
        for (int64_t l = 0; l < 3; ++l) {
          cache.append(l, at::randn({1, 2, 20, 4}), at::randn({1, 2, 20, 4}), 0);
          cache.accumulate_attention(l, at::rand({1, 2, 20}), 1.0);
          recent.per_layer.push_back(at::randn({1, 2, 2, 4}));
        }
        recent.positions = at::arange(18, 20, at::kLong);
        try {
          cache.compress(*c, nullptr, &recent);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "accepted, then compress failed: " << e.what();
          continue;
        }
        for (int64_t l = 0; l < 3; ++l) {
          EXPECT_LE(cache.length(l), 20);
          const at::Tensor p = cache.positions(l);
          if (p.numel() > 0) {
            EXPECT_GE(p.min().item<int64_t>(), 0);
            EXPECT_LT(p.max().item<int64_t>(), 20);
          }
        }
      }
    }
  }
  EXPECT_GT(accepted, 50);
  EXPECT_GT(refused, 200);
}
