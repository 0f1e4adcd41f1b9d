// The runtime's tokenizers (runtime/tokenizer.hpp). The byte-level BPE against ids that Hugging
// Face `tokenizers` gave for GPT-NeoX's tokenizer.json (tests/reference/make_tokenizer_cases.py:
// hand-written cases, the bundled eval texts, the whole bundled books); decoding and round
// trips; UTF-8 handling; every refusal of a tokenizer.json it cannot reproduce; the loaders.
#include <kvcompress/runtime/byte_level_bpe.hpp>
#include <kvcompress/runtime/sentencepiece_bpe.hpp>
#include <kvcompress/runtime/token_file.hpp>
#include <kvcompress/runtime/tokenizer.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>
#include <random>
#include <sstream>

namespace rt = kvcompress::runtime;
using nlohmann::json;

namespace {

const std::string kData = KVC_DATA_DIR;
const std::string kNeox = kData + "/tokenizers/gpt-neox-20b/tokenizer.json";
const std::string kReference = KVC_TOKENIZER_REFERENCE;  // tests/reference/gpt_neox_tokenizer
const char* kBooks[] = {"pg10321_dragons_blood", "pg10356_travels_in_morocco_vol2",
                        "pg10762_impressions_of_theophrastus_such"};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const rt::ByteLevelBPE& neox() {
  static const rt::ByteLevelBPE tokenizer(slurp(kNeox), "gpt-neox-20b");
  return tokenizer;
}

const json& reference() {
  static const json j = json::parse(slurp(kReference + "/cases.json"));
  return j;
}

// As make_tokenizer_cases.py hashes a book's ids: FNV-1a 64 over "id id id ...".
std::string fnv1a64(const std::vector<int64_t>& ids) {
  uint64_t h = 0xcbf29ce484222325ull;
  std::string text;
  for (size_t i = 0; i < ids.size(); ++i) text += (i ? " " : "") + std::to_string(ids[i]);
  for (unsigned char c : text) h = (h ^ c) * 0x100000001b3ull;
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const kvcompress::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// The GPT-NeoX tokenizer.json with one change, for the refusal tests.
std::string neox_with(const std::function<void(json&)>& change) {
  static const json base = json::parse(slurp(kNeox));
  json j = base;
  change(j);
  return j.dump();
}

}  // namespace

TEST(ByteLevelBPE, MatchesHuggingFaceOnHandWrittenCases) {
  const json& ref = reference();
  ASSERT_GE(ref.at("cases").size(), 30u);
  for (const auto& c : ref.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    const auto ids = c.at("ids").get<std::vector<int64_t>>();
    EXPECT_EQ(neox().encode(text), ids) << c.at("name");
    EXPECT_EQ(neox().decode(ids), c.at("decoded").get<std::string>()) << c.at("name");
  }
}

TEST(ByteLevelBPE, MatchesHuggingFaceOnTheBundledEvalTexts) {
  for (const char* book : kBooks) {
    const auto ids = neox().encode(slurp(kData + "/eval_text/" + book + ".txt"));
    const auto expected = rt::read_token_file(kReference + "/" + book + ".ids");
    ASSERT_GT(expected.size(), 5000u);
    EXPECT_EQ(ids, expected) << book;
  }
}

TEST(ByteLevelBPE, MatchesHuggingFaceOnTheWholeBooks) {
  for (const auto& b : reference().at("books")) {
    const std::string text = slurp(kData + "/../" + b.at("file").get<std::string>());
    const auto ids = neox().encode(text);
    EXPECT_EQ(static_cast<int64_t>(ids.size()), b.at("tokens").get<int64_t>()) << b.at("file");
    EXPECT_EQ(fnv1a64(ids), b.at("fnv1a64").get<std::string>()) << b.at("file");
    EXPECT_EQ(neox().decode(ids), text) << "round trip of " << b.at("file");  // the books are NFC
  }
}

TEST(ByteLevelBPE, SpaceRunsAreTheAddedTokensLongestFirst) {
  // Runs of 2..24 spaces are added tokens 50276..50254, cut out before the pattern applies.
  EXPECT_EQ(neox().encode("a  b"), (std::vector<int64_t>{66, 50276, 67}));
  std::vector<int64_t> ids = neox().encode("x" + std::string(24 * 3 + 1, ' ') + "y");
  const auto space_y = neox().encode(" y");
  ASSERT_EQ(space_y.size(), 1u);
  EXPECT_EQ(ids, (std::vector<int64_t>{89, 50254, 50254, 50254, space_y[0]}));  // 89 = "x"
  EXPECT_EQ(neox().decode(ids), "x" + std::string(73, ' ') + "y");
  EXPECT_EQ(neox().encode("<|endoftext|>"), (std::vector<int64_t>{0}));
  EXPECT_EQ(neox().vocab_size(), 50277);
  EXPECT_EQ(neox().kind(), "byte-level-bpe");
}

TEST(ByteLevelBPE, RandomTextsRoundTrip) {
  // Characters of many classes (no combining marks, so every text is already NFC): decoding
  // the ids gives the text back, whatever the pattern and the merges made of it.
  const std::vector<char32_t> alphabet = {'a', 'Z', '0', '9', ' ', ' ', '\n', '\t', '\r', '\'', 's', 't', '.', '!',
                                          0xA0, 0xE9, 0xDF, 0x3C0, 0x416, 0x4E2D, 0x6587, 0x3042, 0xD55C, 0x2003,
                                          0x3000, 0x2028, 0x85, 0x661, 0xBD, 0x1F600, 0x1F44D, 0x200D, 0xFFFD, 0x7F, 0x0};
  std::mt19937 rng(11);
  for (int n = 0; n < 400; ++n) {
    std::string text;
    const int len = static_cast<int>(rng() % 40);
    for (int i = 0; i < len; ++i) {
      char32_t c = alphabet[rng() % alphabet.size()];
      if (c < 0x80) text += static_cast<char>(c);
      else if (c < 0x800) text += {static_cast<char>(0xC0 | (c >> 6)), static_cast<char>(0x80 | (c & 0x3F))};
      else if (c < 0x10000)
        text += {static_cast<char>(0xE0 | (c >> 12)), static_cast<char>(0x80 | ((c >> 6) & 0x3F)),
                 static_cast<char>(0x80 | (c & 0x3F))};
      else
        text += {static_cast<char>(0xF0 | (c >> 18)), static_cast<char>(0x80 | ((c >> 12) & 0x3F)),
                 static_cast<char>(0x80 | ((c >> 6) & 0x3F)), static_cast<char>(0x80 | (c & 0x3F))};
    }
    const auto ids = neox().encode(text);
    for (int64_t id : ids) ASSERT_TRUE(id >= 0 && id < neox().vocab_size());
    ASSERT_EQ(neox().decode_bytes(ids), text) << "text #" << n;
  }
}

TEST(ByteLevelBPE, RandomBytesAreRefusedAtTheirOffsetOrEncoded) {
  // Byte strings rich in UTF-8 lead and continuation bytes: each is valid (then its ids decode
  // to valid UTF-8) or refused naming exactly the offset of its first invalid sequence; lossy()
  // always gives valid UTF-8.
  const std::vector<unsigned char> bytes = {'a', ' ', ' ', '\'', 's', '1', '\n', 0x80, 0xBF, 0xC2, 0xC3, 0xA9,
                                            0xE0, 0xE2, 0x82, 0xAC, 0xED, 0xA0, 0xEF, 0xF0, 0x9F, 0x98, 0xF4,
                                            0x90, 0xC0, 0xFF, 0xCC, 0x81};
  std::mt19937 rng(5);
  int valid = 0, invalid = 0;
  for (int n = 0; n < 2000; ++n) {
    std::string s;
    for (int i = 0, len = static_cast<int>(rng() % 12); i < len; ++i) s += static_cast<char>(bytes[rng() % bytes.size()]);
    ASSERT_EQ(rt::utf8::first_invalid(rt::utf8::lossy(s)), std::string::npos);
    const size_t bad = rt::utf8::first_invalid(s);
    if (bad == std::string::npos) {
      ++valid;
      ASSERT_EQ(rt::utf8::first_invalid(neox().decode_bytes(neox().encode(s))), std::string::npos);
    } else {
      ++invalid;
      expect_error([&] { neox().encode(s); }, "invalid sequence at byte offset " + std::to_string(bad) + " ");
    }
  }
  EXPECT_GT(valid, 100);
  EXPECT_GT(invalid, 100);
}

TEST(ByteLevelBPE, NormalizesToNFC) {
  // "e" + combining acute is "é" after NFC: the same ids as the precomposed text.
  EXPECT_EQ(neox().encode("Cafe\xCC\x81"), neox().encode("Caf\xC3\xA9"));
  EXPECT_EQ(neox().decode(neox().encode("Cafe\xCC\x81")), "Caf\xC3\xA9");
}

TEST(Utf8, InvalidTextIsRefusedWithItsByteOffset) {
  expect_error([] { neox().encode("abc\xFF" "def"); }, "invalid sequence at byte offset 3 (byte 0xFF)");
  expect_error([] { neox().encode("ok \xC3"); }, "byte offset 3");                  // truncated
  expect_error([] { neox().encode("\xC0\xAF"); }, "byte offset 0");                 // overlong '/'
  expect_error([] { neox().encode("x\xED\xA0\x80"); }, "byte offset 1");            // a surrogate
  expect_error([] { neox().encode("\xF4\x90\x80\x80"); }, "byte offset 0");         // past U+10FFFF
  EXPECT_EQ(rt::utf8::first_invalid("plain \xE2\x82\xAC"), std::string::npos);
  const rt::SentencePieceBPE spm(slurp(kData + "/pg19-neox-tiny.spm.model"));
  expect_error([&] { spm.encode("ab\x80"); }, "byte offset 2");
}

TEST(Utf8, LossyReplacesEachMaximalInvalidSubsequence) {
  // As Rust's from_utf8_lossy (what Hugging Face's decode returns).
  EXPECT_EQ(rt::utf8::lossy("a\xE2\x82" "b"), "a\xEF\xBF\xBD" "b");             // one start of "€"
  EXPECT_EQ(rt::utf8::lossy("\xF0\x9F\x98"), "\xEF\xBF\xBD");                     // cut emoji
  EXPECT_EQ(rt::utf8::lossy("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");            // never-valid bytes
  EXPECT_EQ(rt::utf8::lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(rt::utf8::lossy("ok \xE2\x82\xAC"), "ok \xE2\x82\xAC");
  // A generated stream cut inside a character: the bytes are partial, decode() marks them.
  const std::string grin = "\xF0\x9F\x98\x80";  // U+1F600, more than one token
  const auto ids = neox().encode(grin);
  ASSERT_GE(ids.size(), 2u);
  const std::string head = neox().decode_bytes({ids[0]});
  EXPECT_TRUE(head.size() < grin.size() && grin.compare(0, head.size(), head) == 0);
  EXPECT_EQ(neox().decode({ids[0]}), "\xEF\xBF\xBD");
  EXPECT_EQ(neox().decode(ids), grin);
}

TEST(ByteLevelBPE, DecodeRefusesIdsOutsideTheVocabulary) {
  expect_error([] { neox().decode({5, 50277}); }, "token id 50277 (entry 1) is not in the tokenizer's vocabulary of 50277");
  expect_error([] { neox().decode({-1}); }, "token id -1");
}

TEST(ByteLevelBPE, RefusesWhatItCannotReproduce) {
  auto refuses = [](const std::function<void(json&)>& change, const std::string& needle) {
    expect_error([&] { rt::ByteLevelBPE(neox_with(change), "t.json"); }, needle);
  };
  refuses([](json& j) { j["model"]["type"] = "WordPiece"; }, "model type 'WordPiece' is not supported");
  refuses([](json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}}; }, "pre_tokenizer 'Metaspace' is not supported");
  refuses([](json& j) { j["pre_tokenizer"] = nullptr; }, "pre_tokenizer 'null' is not supported");
  refuses([](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }, "normalizer 'Lowercase' is not supported");
  refuses([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, "decoder 'WordPiece' is not supported");
  refuses([](json& j) { j["model"]["dropout"] = 0.1; }, "dropout is not supported");
  refuses([](json& j) { j["model"]["continuing_subword_prefix"] = "##"; }, "continuing_subword_prefix is not supported");
  refuses([](json& j) { j["model"]["byte_fallback"] = true; }, "byte_fallback is not supported");
  refuses([](json& j) { j["added_tokens"][0]["lstrip"] = true; }, "'<|endoftext|>' has lstrip=true");
  refuses([](json& j) { j["model"]["merges"][3] = "h zzzq"; }, "merge 3 'h zzzq' uses or makes a token that is not in");
  refuses([](json& j) { j["model"]["merges"][0] = "a b c"; }, "merge 0 'a b c' is not two tokens");
  refuses([](json& j) { j["model"]["vocab"].erase("a"); }, "uses or makes a token that is not in the vocabulary");
  refuses([](json& j) { j["model"]["vocab"].erase("a"), j["model"]["merges"] = json::array(); },
          "the vocabulary has no token for byte 0x61");
  refuses([](json& j) { j["model"]["vocab"]["zzz"] = -4; }, "token id -4 is out of range");
  refuses([](json& j) { j["model"]["vocab"] = 7; }, "model.vocab is not an object");
  refuses([](json& j) { j["added_tokens"][0]["id"] = "zero"; }, "unexpected content");
  refuses([](json& j) { j.erase("model"); }, "no 'model'");
  expect_error([] { rt::ByteLevelBPE("{\"model\": ", "cut.json"); }, "tokenizer cut.json is not valid JSON");
  // The newer merges format (pairs) gives the same tokenizer.
  const rt::ByteLevelBPE pairs(neox_with([](json& j) {
    json list = json::array();
    for (const auto& m : j["model"]["merges"]) {
      const std::string s = m.get<std::string>();
      list.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
    }
    j["model"]["merges"] = list;
  }));
  const std::string text = slurp(kData + "/eval_text/" + kBooks[0] + ".txt").substr(0, 4000);
  EXPECT_EQ(pairs.encode(text), neox().encode(text));
}

TEST(SentencePieceBPE, DecodesWhatItEncodes) {
  const rt::SentencePieceBPE spm(slurp(kData + "/pg19-neox-tiny.spm.model"));
  EXPECT_EQ(spm.kind(), "sentencepiece-bpe");
  for (const char* book : kBooks) {
    const std::string text = slurp(kData + "/eval_text/" + book + ".txt");
    const auto ids = spm.encode(text);
    EXPECT_EQ(ids, rt::read_token_file(kData + "/eval_tokens/" + book + ".ids")) << book;  // Python's sentencepiece
    EXPECT_EQ(spm.decode(ids), text) << book;
  }
  // Characters the model has no piece for go through byte pieces and come back whole.
  const std::string rare = "\xE2\x9C\x93 \xF0\x9F\x98\x80 \xE4\xB8\xAD";
  EXPECT_EQ(spm.decode(spm.encode(rare)), rare);
  expect_error([&] { spm.decode({spm.vocab_size()}); }, "is not in the tokenizer's vocabulary");
}

TEST(Tokenizers, LoadedByContent) {
  EXPECT_EQ(rt::load_tokenizer(kNeox)->kind(), "byte-level-bpe");
  EXPECT_EQ(rt::load_tokenizer(kData + "/pg19-neox-tiny.spm.model")->kind(), "sentencepiece-bpe");
  const auto embedded = rt::load_tokenizer(kData + "/pg19-neox-tiny.pt");  // kvc/tokenizer.model
  EXPECT_EQ(embedded->kind(), "sentencepiece-bpe");
  EXPECT_EQ(embedded->vocab_size(), 6144);
  expect_error([] { rt::load_tokenizer("/nonexistent/tokenizer.json"); }, "tokenizer file not found or unreadable");
  const std::string garbage = testing::TempDir() + "kvc_garbage.model";
  std::ofstream(garbage) << "\x08\x96\x01 not a model";
  expect_error([&] { rt::load_tokenizer(garbage); }, "is neither a tokenizer.json nor a SentencePiece model");
}

TEST(TokenFiles, WriteThenRead) {
  const std::vector<int64_t> ids = {0, 5, 50276, 12, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17};
  const std::string path = testing::TempDir() + "kvc_ids.ids";
  {
    std::ofstream out(path);
    rt::write_token_file(out, ids, 50277, "gpt-neox-20b");
  }
  EXPECT_EQ(slurp(path).rfind("# kvcompress-tokens v1 vocab_size=50277 tokenizer=gpt-neox-20b\n0 5 50276", 0), 0u);
  EXPECT_EQ(rt::read_token_file(path), ids);
  std::ofstream(path) << "# kvcompress-tokens v1\n1 2 x3\n";
  expect_error([&] { rt::read_token_file(path); }, "'x3' is not a token id (entry 2)");
}
