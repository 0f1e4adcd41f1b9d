#pragma once
// A byte-level BPE tokenizer from a Hugging Face tokenizer.json (GPT-2, GPT-NeoX, Pythia): the
// ids Hugging Face `tokenizers` gives with add_special_tokens=False, for any UTF-8 text.
//
// Encoding follows the library's order: added tokens are cut out first (leftmost-longest;
// those with normalized=false from the raw text, the others after normalization), each piece
// between them is normalized (NFC/NFD/NFKC/NFKD from utf8proc), split by the GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (letter and number classes from utf8proc's Unicode tables), mapped byte by byte to the
// byte-level alphabet and merged by rank. Anything else a tokenizer.json may hold (another
// model, normalizer, pre-tokenizer or decoder, dropout, word prefixes or suffixes, lstrip /
// rstrip / single_word added tokens) is refused with an Error naming it. Truncation and
// padding settings are ignored: texts are encoded whole.
//
// Compiled into kvcompress::runtime (src/tokenizer.cpp, which needs nlohmann-json and
// utf8proc at build time); a runtime configured with KVCOMPRESS_BYTE_LEVEL_BPE=OFF throws on
// construction, saying so.
#include <kvcompress/runtime/tokenizer.hpp>

#include <memory>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

class ByteLevelBPE final : public Tokenizer {
 public:
  /// Parses the text of a tokenizer.json; `origin` names it in errors.
  explicit ByteLevelBPE(const std::string& json_text, const std::string& origin = "tokenizer.json");
  ~ByteLevelBPE() override;
  ByteLevelBPE(ByteLevelBPE&&) noexcept;
  ByteLevelBPE& operator=(ByteLevelBPE&&) noexcept;

  std::vector<int64_t> encode(const std::string& text) const override;
  std::string decode_bytes(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override;
  std::string kind() const override { return "byte-level-bpe"; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace runtime
}  // namespace kvcompress
