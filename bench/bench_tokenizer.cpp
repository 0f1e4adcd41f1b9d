// Tokenizer speed: encoding a whole bundled book (342 KB, 79,349 ids) with GPT-NeoX's
// tokenizer.json (byte-level BPE) and with the bundled SentencePiece model, one thread.
#include <kvcompress/runtime/byte_level_bpe.hpp>
#include <kvcompress/runtime/sentencepiece_bpe.hpp>

#include <benchmark/benchmark.h>

#include <fstream>
#include <sstream>

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const std::string kData = KVC_DATA_DIR;
const std::string kBook = kData + "/books/pg10762_impressions_of_theophrastus_such.txt";

void encode_book(benchmark::State& state, const kvcompress::runtime::Tokenizer& tokenizer) {
  const std::string text = slurp(kBook);
  size_t ids = 0;
  for (auto _ : state) {
    auto out = tokenizer.encode(text);
    ids = out.size();
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
  state.counters["ids"] = static_cast<double>(ids);
}

void BM_ByteLevelBPE_EncodeBook(benchmark::State& state) {
  const kvcompress::runtime::ByteLevelBPE tokenizer(slurp(kData + "/tokenizers/gpt-neox-20b/tokenizer.json"));
  encode_book(state, tokenizer);
}
BENCHMARK(BM_ByteLevelBPE_EncodeBook)->Unit(benchmark::kMillisecond);

void BM_SentencePieceBPE_EncodeBook(benchmark::State& state) {
  const kvcompress::runtime::SentencePieceBPE tokenizer(slurp(kData + "/pg19-neox-tiny.spm.model"));
  encode_book(state, tokenizer);
}
BENCHMARK(BM_SentencePieceBPE_EncodeBook)->Unit(benchmark::kMillisecond);

void BM_ByteLevelBPE_Load(benchmark::State& state) {
  const std::string json = slurp(kData + "/tokenizers/gpt-neox-20b/tokenizer.json");
  for (auto _ : state) benchmark::DoNotOptimize(kvcompress::runtime::ByteLevelBPE(json).vocab_size());
}
BENCHMARK(BM_ByteLevelBPE_Load)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
