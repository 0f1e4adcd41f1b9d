#pragma once
// Tokenizers of kvcompress::runtime: one interface, two implementations.
//  - SentencePieceBPE (sentencepiece_bpe.hpp): the .model files kvcompress trains (the bundled
//    model's), read from the protobuf directly.
//  - ByteLevelBPE (byte_level_bpe.hpp): a Hugging Face tokenizer.json with a byte-level BPE
//    model, as GPT-2, GPT-NeoX and Pythia use; the same ids as the `tokenizers` library.
// load_tokenizer() picks by content: a tokenizer.json, a SentencePiece .model, or a contract .pt
// file that embeds either (kvc/tokenizer.json, kvc/tokenizer.model).
#include <kvcompress/types.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  /// Ids of a UTF-8 text, with no special tokens added (`add_special_tokens=False`). Invalid
  /// UTF-8 is an Error naming the byte offset (Python's tokenizers cannot take such text).
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  /// The bytes the ids spell, concatenated. A sequence cut inside a character (as a stream of
  /// generated tokens can be) gives a partial UTF-8 sequence; decode() replaces those.
  virtual std::string decode_bytes(const std::vector<int64_t>& ids) const = 0;
  /// Ids are in [0, vocab_size()).
  virtual int64_t vocab_size() const = 0;
  /// "sentencepiece-bpe" or "byte-level-bpe".
  virtual std::string kind() const = 0;

  /// Text of the ids as valid UTF-8: decode_bytes() with each invalid sequence replaced by
  /// U+FFFD, as Hugging Face's decode does (Rust's from_utf8_lossy).
  std::string decode(const std::vector<int64_t>& ids) const;
};

/// A tokenizer from the bytes of a tokenizer.json or of a SentencePiece .model (told apart by
/// content); `origin` names them in errors.
std::unique_ptr<Tokenizer> tokenizer_from_bytes(const std::string& bytes, const std::string& origin);

/// A tokenizer from a file: a tokenizer.json, a SentencePiece .model, or a contract model .pt
/// (only its embedded tokenizer is read, not its weights).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

namespace utf8 {
/// The byte offset of the first invalid UTF-8 sequence (overlong forms, surrogates and code
/// points past U+10FFFF are invalid), or std::string::npos.
size_t first_invalid(const std::string& text);
/// Throws an Error naming `what` and the offset of the first invalid sequence, if any.
void require_valid(const std::string& text, const std::string& what);
/// `bytes` with each maximal invalid subsequence replaced by U+FFFD.
std::string lossy(const std::string& bytes);
}  // namespace utf8

}  // namespace runtime
}  // namespace kvcompress
