#pragma once
// A SentencePiece BPE encoder for the model files kvcompress trains (identity normalization,
// byte fallback), written against the .model protobuf directly. Debian's libsentencepiece
// cannot share a process with LibTorch (both register protobuf descriptors; it crashes at load),
// and the GPU image has no C++ SentencePiece at all. Other tokenizer settings are refused with a
// clear error: pre-tokenize such text with examples/python/tokenize_text.py, or use kvtok.
// One of the runtime's two tokenizers (tokenizer.hpp); header-only.
#include <kvcompress/runtime/tokenizer.hpp>
#include <kvcompress/types.hpp>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvcompress {
namespace runtime {

class SentencePieceBPE final : public Tokenizer {
 public:
  /// Parses a serialized ModelProto (the bytes of a .model file).
  explicit SentencePieceBPE(const std::string& model_bytes) {
    Reader r{model_bytes.data(), model_bytes.data() + model_bytes.size()};
    int model_type = 1;  // UNIGRAM unless the trainer spec says otherwise
    while (!r.done()) {
      const auto [field, wire] = r.key();
      if (field == 1 && wire == 2) add_piece(r.bytes());
      else if (field == 2 && wire == 2) read_trainer_spec(r.bytes(), model_type);
      else if (field == 3 && wire == 2) read_normalizer_spec(r.bytes());
      else r.skip(wire);
    }
    if (pieces_.empty() && reserved_.empty()) fail("no pieces");
    if (model_type != 2) fail("model type is not BPE");
    if (normalizer_ != "identity")
      fail("normalization rule '" + normalizer_ + "' is not supported (only 'identity')");
    if (remove_extra_whitespaces_) fail("remove_extra_whitespaces=true is not supported");
    if (has_user_defined_) fail("user-defined symbols are not supported");
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(scores_.size()); }
  std::string kind() const override { return "sentencepiece-bpe"; }

  std::vector<int64_t> encode(const std::string& text) const override {
    utf8::require_valid(text, "text");
    std::string norm;
    norm.reserve(text.size() + 3);
    if (add_dummy_prefix_ && !text.empty()) norm += kSpace;
    for (char c : text) {
      if (c == ' ' && escape_whitespaces_) norm += kSpace;
      else norm += c;
    }
    // Symbols start as single UTF-8 characters, linked in a list.
    struct Symbol { size_t begin, len; int prev, next; };
    std::vector<Symbol> sym;
    for (size_t i = 0; i < norm.size();) {
      const size_t n = std::min(char_len(static_cast<unsigned char>(norm[i])), norm.size() - i);
      sym.push_back({i, n, static_cast<int>(sym.size()) - 1, static_cast<int>(sym.size()) + 1});
      i += n;
    }
    if (!sym.empty()) sym.back().next = -1;
    struct Pair { int left, right; float score; size_t len; };
    auto lower = [](const Pair& a, const Pair& b) {  // highest score first, then leftmost
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::priority_queue<Pair, std::vector<Pair>, decltype(lower)> agenda(lower);
    auto try_pair = [&](int left, int right) {
      if (left < 0 || right < 0) return;
      const size_t len = sym[left].len + sym[right].len;
      auto it = pieces_.find(std::string(norm, sym[left].begin, len));
      if (it != pieces_.end()) agenda.push({left, right, scores_[it->second], len});
    };
    for (size_t i = 1; i < sym.size(); ++i) try_pair(static_cast<int>(i) - 1, static_cast<int>(i));
    while (!agenda.empty()) {
      const Pair top = agenda.top();
      agenda.pop();
      Symbol& l = sym[top.left];
      Symbol& r = sym[top.right];
      if (l.len == 0 || r.len == 0 || l.len + r.len != top.len || l.next != top.right) continue;
      l.len += r.len;
      l.next = r.next;
      if (r.next >= 0) sym[r.next].prev = top.left;
      r.len = 0;
      try_pair(l.prev, top.left);
      try_pair(top.left, l.next);
    }
    std::vector<int64_t> ids;
    for (int i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) {
      const std::string piece(norm, sym[i].begin, sym[i].len);
      if (auto it = pieces_.find(piece); it != pieces_.end()) { ids.push_back(it->second); continue; }
      if (auto it = reserved_.find(piece); it != reserved_.end()) { ids.push_back(it->second); continue; }
      for (unsigned char b : piece) {  // byte fallback, else <unk>
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        auto it = reserved_.find(name);
        if (it != reserved_.end()) ids.push_back(it->second);
        else if (unk_id_ >= 0) { ids.push_back(unk_id_); break; }
        else fail("character without a piece and no byte fallback or <unk>");
      }
    }
    return ids;
  }

  /// As SentencePiece decodes: the space mark is a space, byte pieces are their byte, control
  /// pieces are empty, <unk> is " \u2047 ", and the dummy prefix's leading space is dropped.
  std::string decode_bytes(const std::vector<int64_t>& ids) const override {
    std::string out;
    for (size_t i = 0; i < ids.size(); ++i) {
      const int64_t id = ids[i];
      if (id < 0 || id >= vocab_size())
        throw Error("token id " + std::to_string(id) + " (entry " + std::to_string(i) +
                    ") is not in the tokenizer's vocabulary of " + std::to_string(vocab_size()));
      const std::string& piece = piece_of_[static_cast<size_t>(id)];
      switch (type_of_[static_cast<size_t>(id)]) {
        case 2: out += " \xe2\x81\x87 "; break;                                  // UNKNOWN
        case 3: break;                                                            // CONTROL
        case 6: out += static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)); break;  // BYTE <0xNN>
        default:
          for (size_t at = 0; at < piece.size();) {
            if (escape_whitespaces_ && piece.compare(at, 3, kSpace) == 0) { out += ' '; at += 3; }
            else out += piece[at++];
          }
      }
    }
    if (add_dummy_prefix_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }

 private:
  static constexpr const char* kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's space mark

  struct Reader {
    const char* p;
    const char* end;
    bool done() const { return p >= end; }
    uint64_t varint() {
      uint64_t v = 0;
      for (int shift = 0; shift < 64; shift += 7) {
        if (p >= end) throw Error("tokenizer model is corrupt (truncated varint)");
        const auto b = static_cast<unsigned char>(*p++);
        v |= static_cast<uint64_t>(b & 0x7f) << shift;
        if (!(b & 0x80)) return v;
      }
      throw Error("tokenizer model is corrupt (bad varint)");
    }
    std::pair<uint64_t, int> key() {
      const uint64_t k = varint();
      return {k >> 3, static_cast<int>(k & 7)};
    }
    std::string bytes() {
      const uint64_t n = varint();
      if (n > static_cast<uint64_t>(end - p)) throw Error("tokenizer model is corrupt (truncated field)");
      std::string s(p, static_cast<size_t>(n));
      p += n;
      return s;
    }
    float fixed32() {
      if (end - p < 4) throw Error("tokenizer model is corrupt (truncated float)");
      float f;
      std::memcpy(&f, p, 4);  // little-endian, as protobuf and x86/ARM hosts are
      p += 4;
      return f;
    }
    void skip(int wire) {
      switch (wire) {
        case 0: varint(); break;
        case 1: if (end - p < 8) throw Error("tokenizer model is corrupt"); p += 8; break;
        case 2: bytes(); break;
        case 5: fixed32(); break;
        default: throw Error("tokenizer model is corrupt (wire type " + std::to_string(wire) + ")");
      }
    }
  };

  [[noreturn]] static void fail(const std::string& what) {
    throw Error("unsupported or corrupt SentencePiece model: " + what);
  }

  static size_t char_len(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c >> 5) == 0x6) return 2;
    if ((c >> 4) == 0xe) return 3;
    if ((c >> 3) == 0x1e) return 4;
    return 1;  // stray continuation byte: a symbol of its own
  }

  void add_piece(const std::string& msg) {
    Reader r{msg.data(), msg.data() + msg.size()};
    std::string piece;
    float score = 0;
    int type = 1;  // NORMAL
    while (!r.done()) {
      const auto [field, wire] = r.key();
      if (field == 1 && wire == 2) piece = r.bytes();
      else if (field == 2 && wire == 5) score = r.fixed32();
      else if (field == 3 && wire == 0) type = static_cast<int>(r.varint());
      else r.skip(wire);
    }
    const int id = static_cast<int>(scores_.size());
    if (type == 6 && !(piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece[5] == '>' &&
                       std::isxdigit(static_cast<unsigned char>(piece[3])) &&
                       std::isxdigit(static_cast<unsigned char>(piece[4]))))
      fail("byte piece " + std::to_string(id) + " is not of the form <0xNN>");
    scores_.push_back(score);
    piece_of_.push_back(piece);
    type_of_.push_back(type);
    // NORMAL, USER_DEFINED and UNUSED pieces take part in merges; UNKNOWN, CONTROL and BYTE
    // pieces are only looked up by name.
    if (type == 1 || type == 4 || type == 5) pieces_.emplace(piece, id);
    else reserved_.emplace(piece, id);
    if (type == 2) unk_id_ = id;
    if (type == 4) has_user_defined_ = true;
  }

  void read_trainer_spec(const std::string& msg, int& model_type) {
    Reader r{msg.data(), msg.data() + msg.size()};
    while (!r.done()) {
      const auto [field, wire] = r.key();
      if (field == 3 && wire == 0) model_type = static_cast<int>(r.varint());
      else r.skip(wire);
    }
  }

  void read_normalizer_spec(const std::string& msg) {
    Reader r{msg.data(), msg.data() + msg.size()};
    while (!r.done()) {
      const auto [field, wire] = r.key();
      if (field == 1 && wire == 2) normalizer_ = r.bytes();
      else if (field == 3 && wire == 0) add_dummy_prefix_ = r.varint() != 0;
      else if (field == 4 && wire == 0) remove_extra_whitespaces_ = r.varint() != 0;
      else if (field == 5 && wire == 0) escape_whitespaces_ = r.varint() != 0;
      else r.skip(wire);
    }
  }

  std::unordered_map<std::string, int> pieces_, reserved_;
  std::vector<float> scores_;
  std::vector<std::string> piece_of_;
  std::vector<int> type_of_;
  int unk_id_ = -1;
  bool has_user_defined_ = false;
  std::string normalizer_ = "nmt_nfkc";  // protobuf defaults
  bool add_dummy_prefix_ = true, remove_extra_whitespaces_ = true, escape_whitespaces_ = true;
};

}  // namespace runtime
}  // namespace kvcompress
