// The compiled part of the runtime's tokenizers (tokenizer.hpp, byte_level_bpe.hpp): UTF-8
// checks, the loaders, and the byte-level BPE (with KVC_RUNTIME_BYTE_LEVEL_BPE, set by CMake
// when nlohmann-json and utf8proc are found; otherwise its constructor says what is missing).
#include <kvcompress/runtime/byte_level_bpe.hpp>
#include <kvcompress/runtime/sentencepiece_bpe.hpp>
#include <kvcompress/runtime/tokenizer.hpp>

#include <kvcompress/params.hpp>

#include <caffe2/serialize/inline_container.h>

#ifdef KVC_RUNTIME_BYTE_LEVEL_BPE
#include <nlohmann/json.hpp>
#include <utf8proc.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>

namespace kvcompress {
namespace runtime {

namespace {

// One UTF-8 sequence at p (n bytes left), by the well-formed forms of Unicode's Table 3-7.
// Returns its length and sets cp, or returns 0 and sets `prefix` to the length of the longest
// start of a well-formed sequence (>= 1): what one U+FFFD replaces.
size_t utf8_next(const unsigned char* p, size_t n, char32_t& cp, size_t& prefix) {
  const unsigned char b = p[0];
  prefix = 1;
  if (b < 0x80) { cp = b; return 1; }
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) len = 2;
  else if (b >= 0xE0 && b <= 0xEF) { len = 3; if (b == 0xE0) lo = 0xA0; if (b == 0xED) hi = 0x9F; }
  else if (b >= 0xF0 && b <= 0xF4) { len = 4; if (b == 0xF0) lo = 0x90; if (b == 0xF4) hi = 0x8F; }
  else return 0;
  char32_t v = b & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
  for (size_t i = 1; i < len; ++i) {
    if (i >= n) return 0;
    const unsigned char c = p[i];
    if (c < (i == 1 ? lo : 0x80) || c > (i == 1 ? hi : 0xBF)) return 0;
    v = (v << 6) | (c & 0x3F);
    prefix = i + 1;
  }
  cp = v;
  return len;
}

std::string read_whole(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(std::string(what) + " not found or unreadable: " + params::printable(path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

namespace utf8 {

size_t first_invalid(const std::string& text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  char32_t cp;
  size_t prefix;
  for (size_t i = 0; i < text.size();) {
    const size_t len = utf8_next(p + i, text.size() - i, cp, prefix);
    if (len == 0) return i;
    i += len;
  }
  return std::string::npos;
}

void require_valid(const std::string& text, const std::string& what) {
  const size_t at = first_invalid(text);
  if (at == std::string::npos) return;
  char byte[8];
  std::snprintf(byte, sizeof byte, "0x%02X", static_cast<unsigned char>(text[at]));
  throw Error(what + " is not valid UTF-8: invalid sequence at byte offset " + std::to_string(at) +
              " (byte " + byte + ")");
}

std::string lossy(const std::string& bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::string out;
  out.reserve(bytes.size());
  char32_t cp;
  size_t prefix;
  for (size_t i = 0; i < bytes.size();) {
    const size_t len = utf8_next(p + i, bytes.size() - i, cp, prefix);
    if (len) { out.append(bytes, i, len); i += len; }
    else { out += "\xEF\xBF\xBD"; i += prefix; }
  }
  return out;
}

}  // namespace utf8

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const { return utf8::lossy(decode_bytes(ids)); }

std::unique_ptr<Tokenizer> tokenizer_from_bytes(const std::string& bytes, const std::string& origin) {
  const size_t bom = bytes.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;  // a UTF-8 byte-order mark
  const size_t first = bytes.find_first_not_of(" \t\r\n", bom);
  if (first != std::string::npos && bytes[first] == '{')
    return std::make_unique<ByteLevelBPE>(bytes.substr(bom), origin);
  try {
    return std::make_unique<SentencePieceBPE>(bytes);
  } catch (const Error& e) {
    throw Error(origin + " is neither a tokenizer.json nor a SentencePiece model (" + e.what() + ")");
  }
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  const std::string name = params::printable(path);
  char head[4] = {};
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error("tokenizer file not found or unreadable: " + name);
    in.read(head, 4);
  }
  if (std::memcmp(head, "PK\x03\x04", 4) != 0) return tokenizer_from_bytes(read_whole(path, "tokenizer file"), name);
  // A contract model (a zip archive): read only its embedded tokenizer, not the weights.
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
  } catch (const std::exception&) {
    throw Error(name + " is a zip file but not a TorchScript model");
  }
  for (const char* entry : {"extra/kvc/tokenizer.json", "extra/kvc/tokenizer.model"}) {
    if (!reader->hasRecord(entry)) continue;
    auto [data, size] = reader->getRecord(entry);
    return tokenizer_from_bytes(std::string(static_cast<const char*>(data.get()), size),
                                name + ":" + (entry + 6));
  }
  throw Error("model file " + name + " embeds no tokenizer (neither kvc/tokenizer.json nor "
              "kvc/tokenizer.model): re-export it with examples/python/export_pythia.py --tokenizer, "
              "or give a tokenizer.json");
}

#ifdef KVC_RUNTIME_BYTE_LEVEL_BPE

namespace {

using nlohmann::json;

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest for U+0100 onwards.
std::array<char32_t, 256> make_byte_to_char() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[static_cast<size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

const std::array<char32_t, 256>& byte_to_char() {
  static const std::array<char32_t, 256> table = make_byte_to_char();
  return table;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) out += static_cast<char>(cp);
  else if (cp < 0x800) { out += static_cast<char>(0xC0 | (cp >> 6)); out += static_cast<char>(0x80 | (cp & 0x3F)); }
  else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

std::vector<char32_t> code_points(const std::string& s) {
  std::vector<char32_t> out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  char32_t cp;
  size_t prefix;
  for (size_t i = 0; i < s.size();) {
    const size_t len = utf8_next(p + i, s.size() - i, cp, prefix);
    if (len == 0) throw Error("internal: invalid UTF-8 after validation");
    out.push_back(cp);
    i += len;
  }
  return out;
}

// The pattern's classes. \s is Oniguruma's Unicode whitespace (what `tokenizers` matches with):
// U+0009..U+000D, U+0085 and the separators Zs, Zl, Zp.
enum class CharClass { space, letter, number, other };
CharClass classify(char32_t c) {
  if (c < 0x80) {  // fast path, same answers as the tables
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CharClass::letter;
    if (c >= '0' && c <= '9') return CharClass::number;
    if (c == ' ' || (c >= 0x09 && c <= 0x0D)) return CharClass::space;
    return CharClass::other;
  }
  if (c == 0x85) return CharClass::space;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: return CharClass::letter;
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO: return CharClass::number;
    case UTF8PROC_CATEGORY_ZS: case UTF8PROC_CATEGORY_ZL: case UTF8PROC_CATEGORY_ZP: return CharClass::space;
    default: return CharClass::other;
  }
}

// Length (in code points) of the pattern's match at i; every position has one.
size_t gpt2_match(const std::vector<char32_t>& cp, const std::vector<CharClass>& cls, size_t i) {
  const size_t n = cp.size();
  if (cp[i] == '\'' && i + 1 < n) {  // 's|'t|'re|'ve|'m|'ll|'d
    const char32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  for (CharClass c : {CharClass::letter, CharClass::number, CharClass::other}) {  // ' ?X+'
    size_t j = i;
    if (cp[j] == ' ' && j + 1 < n && cls[j + 1] == c) ++j;
    if (cls[j] != c) continue;
    while (j < n && cls[j] == c) ++j;
    return j - i;
  }
  size_t k = i;  // a whitespace run: \s+(?!\S) leaves the last one to the next token, else \s+
  while (k < n && cls[k] == CharClass::space) ++k;
  if (k == n || k - i == 1) return k - i;
  return k - i - 1;
}

struct AddedToken {
  std::string content;
  int64_t id;
  bool normalized;
};

}  // namespace

struct ByteLevelBPE::Impl {
  std::string origin;
  int utf8proc_options = 0;                    // 0: no normalizer
  bool add_prefix_space = false, use_regex = true, ignore_merges = false;
  std::unordered_map<std::string, int32_t> vocab;  // byte-level token text -> id
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, id)
  std::array<int32_t, 256> byte_id{};         // the id of each single byte
  std::vector<std::string> bytes_of;          // id -> the bytes it stands for
  std::vector<bool> has_id;
  std::vector<AddedToken> raw_added, normalized_added;  // longest first

  [[noreturn]] void fail(const std::string& what) const {
    throw Error("unsupported or malformed tokenizer " + origin + ": " + what);
  }
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void read_normalizer(const json& n) {
    if (n.is_null()) return;
    const std::string type = n.at("type").get<std::string>();
    if (type == "Sequence") {
      for (const auto& sub : n.at("normalizers")) read_normalizer(sub);
      return;
    }
    int form;
    if (type == "NFC") form = UTF8PROC_COMPOSE;
    else if (type == "NFD") form = UTF8PROC_DECOMPOSE;
    else if (type == "NFKC") form = UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    else if (type == "NFKD") form = UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    else fail("normalizer '" + type + "' is not supported (only NFC, NFD, NFKC, NFKD)");
    if (utf8proc_options) fail("more than one Unicode normalization form in the normalizer");
    utf8proc_options = UTF8PROC_STABLE | form;
  }

  void read_pre_tokenizer(const json& p) {
    const std::string type = p.is_null() ? "null" : p.at("type").get<std::string>();
    if (type != "ByteLevel") fail("pre_tokenizer '" + type + "' is not supported (only ByteLevel)");
    add_prefix_space = p.value("add_prefix_space", false);
    use_regex = p.value("use_regex", true);
  }

  void read_model(const json& m) {
    const std::string type = m.value("type", std::string("BPE"));
    if (type != "BPE") fail("model type '" + type + "' is not supported (only BPE)");
    if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() != 0.0)
      fail("BPE dropout is not supported (it makes encoding random)");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(k) && !m[k].is_null() && !m[k].get<std::string>().empty())
        fail(std::string("BPE ") + k + " is not supported by the byte-level model");
    if (m.value("byte_fallback", false)) fail("BPE byte_fallback is not supported by the byte-level model");
    ignore_merges = m.value("ignore_merges", false);
    if (!m.at("vocab").is_object()) fail("model.vocab is not an object");
    for (const auto& [text, id] : m.at("vocab").items()) add_id(text, id.get<int64_t>());
    const auto& list = m.at("merges");
    int32_t rank = 0;
    for (const auto& entry : list) {
      std::string a, b;
      if (entry.is_string()) {  // "a b"
        const std::string s = entry.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail("merge " + std::to_string(rank) + " '" + params::printable(s) + "' is not two tokens");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {  // ["a", "b"]
        if (!entry.is_array() || entry.size() != 2) fail("merge " + std::to_string(rank) + " is not a pair");
        a = entry[0].get<std::string>(), b = entry[1].get<std::string>();
      }
      const auto ia = vocab.find(a), ib = vocab.find(b), ic = vocab.find(a + b);
      if (ia == vocab.end() || ib == vocab.end() || ic == vocab.end())
        fail("merge " + std::to_string(rank) + " '" + params::printable(a + " " + b) +
             "' uses or makes a token that is not in the vocabulary");
      merges.emplace(key(ia->second, ib->second), std::make_pair(rank, ic->second));
      ++rank;
    }
  }

  // The entry of `id` in bytes_of (the token's text until finish_tables makes it bytes).
  std::string& slot(int64_t id, const char* what) {
    if (id < 0 || id >= (int64_t{1} << 24)) fail(std::string(what) + " id " + std::to_string(id) + " is out of range");
    const auto i = static_cast<size_t>(id);
    if (i >= bytes_of.size()) bytes_of.resize(i + 1), has_id.resize(i + 1);
    has_id[i] = true;
    return bytes_of[i];
  }

  void add_id(const std::string& text, int64_t id) {
    slot(id, "token") = text;
    if (!vocab.emplace(text, static_cast<int32_t>(id)).second) fail("token '" + params::printable(text) + "' is in the vocabulary twice");
  }

  void read_added(const json& list) {
    for (const auto& t : list) {
      AddedToken a{t.at("content").get<std::string>(), t.at("id").get<int64_t>(), t.value("normalized", true)};
      if (a.content.empty()) fail("added token " + std::to_string(a.id) + " is empty");
      for (const char* flag : {"single_word", "lstrip", "rstrip"})
        if (t.value(flag, false))
          fail(std::string("added token '") + params::printable(a.content) + "' has " + flag +
               "=true, which is not supported");
      slot(a.id, "added token") = a.content;
      if (a.normalized) a.content = normalize(a.content);  // matched in normalized text
      (a.normalized ? normalized_added : raw_added).push_back(std::move(a));
    }
    for (auto* v : {&raw_added, &normalized_added})
      std::stable_sort(v->begin(), v->end(), [](const AddedToken& x, const AddedToken& y) {
        return x.content.size() > y.content.size();
      });
  }

  // Token text -> bytes: byte-level characters map back to their bytes; a text with any other
  // character stands for its own UTF-8 (as the ByteLevel decoder does, e.g. for added tokens).
  void finish_tables() {
    const auto& table = byte_to_char();
    std::unordered_map<char32_t, unsigned char> char_byte;
    for (int b = 0; b < 256; ++b) char_byte.emplace(table[static_cast<size_t>(b)], static_cast<unsigned char>(b));
    for (int b = 0; b < 256; ++b) {
      std::string ch;
      append_utf8(ch, table[static_cast<size_t>(b)]);
      const auto it = vocab.find(ch);
      // Bytes that valid UTF-8 never holds (C0, C1, F5..FF) may lack a token (GPT-NeoX's do).
      const bool in_utf8 = !(b == 0xC0 || b == 0xC1 || b >= 0xF5);
      if (it == vocab.end() && in_utf8) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02X", b);
        fail(std::string("the vocabulary has no token for byte ") + hex + " (not a byte-level BPE)");
      }
      byte_id[static_cast<size_t>(b)] = it == vocab.end() ? -1 : it->second;
    }
    for (auto& text : bytes_of) {
      std::string raw;
      bool mapped = true;
      for (char32_t c : code_points(text)) {
        const auto it = char_byte.find(c);
        if (it == char_byte.end()) { mapped = false; break; }
        raw += static_cast<char>(it->second);
      }
      if (mapped) text = std::move(raw);
    }
  }

  std::string normalize(const std::string& s) const {
    if (!utf8proc_options) return s;
    if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; }))
      return s;  // ASCII is in every normal form
    utf8proc_uint8_t* out = nullptr;
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                            static_cast<utf8proc_ssize_t>(s.size()), &out,
                                            static_cast<utf8proc_option_t>(utf8proc_options));
    if (n < 0) throw Error(std::string("Unicode normalization failed: ") + utf8proc_errmsg(n));
    std::string r(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
    std::free(out);
    return r;
  }

  // Calls piece(begin, end, id) for text pieces (id -1) and added tokens, leftmost-longest.
  template <class F>
  static void split_added(const std::string& s, const std::vector<AddedToken>& added, F&& piece) {
    size_t start = 0, i = 0;
    while (!added.empty() && i < s.size()) {
      const AddedToken* hit = nullptr;
      for (const auto& a : added)  // longest first
        if (a.content[0] == s[i] && s.compare(i, a.content.size(), a.content) == 0) { hit = &a; break; }
      if (!hit) { ++i; continue; }
      if (i > start) piece(start, i, int64_t{-1});
      piece(i, i + hit->content.size(), hit->id);
      i += hit->content.size();
      start = i;
    }
    if (start < s.size()) piece(start, s.size(), int64_t{-1});
  }

  void bpe(const std::string& word, std::vector<int64_t>& out,
           std::unordered_map<std::string, std::vector<int32_t>>& cache) const {
    if (auto it = cache.find(word); it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
    std::vector<int32_t> ids;
    if (ignore_merges) {
      std::string chars;
      for (unsigned char b : word) append_utf8(chars, byte_to_char()[b]);
      if (auto v = vocab.find(chars); v != vocab.end()) ids.push_back(v->second);
    }
    if (ids.empty()) {
      // tokenizers' Word::merge_all: the lowest rank first, the leftmost among equal ranks.
      struct Sym { int32_t id; int prev, next; bool alive; };
      std::vector<Sym> sym(word.size());
      for (size_t i = 0; i < word.size(); ++i) {
        const int32_t id = byte_id[static_cast<unsigned char>(word[i])];
        if (id < 0) throw Error("internal: a byte that valid UTF-8 never holds reached the BPE");
        sym[i] = {id, static_cast<int>(i) - 1, i + 1 < word.size() ? static_cast<int>(i) + 1 : -1, true};
      }
      struct Merge { int32_t rank; int pos; int32_t id; };
      auto later = [](const Merge& a, const Merge& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
      std::priority_queue<Merge, std::vector<Merge>, decltype(later)> queue(later);
      auto consider = [&](int left) {
        if (left < 0 || sym[left].next < 0) return;
        const auto it = merges.find(key(sym[left].id, sym[sym[left].next].id));
        if (it != merges.end()) queue.push({it->second.first, left, it->second.second});
      };
      for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) consider(i);
      while (!queue.empty()) {
        const Merge m = queue.top();
        queue.pop();
        Sym& l = sym[m.pos];
        if (!l.alive || l.next < 0) continue;
        const auto it = merges.find(key(l.id, sym[l.next].id));
        if (it == merges.end() || it->second.second != m.id) continue;  // stale entry
        Sym& r = sym[l.next];
        l.id = m.id;
        r.alive = false;
        l.next = r.next;
        if (r.next >= 0) sym[r.next].prev = m.pos;
        consider(l.prev);
        consider(m.pos);
      }
      for (int i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) ids.push_back(sym[i].id);
    }
    out.insert(out.end(), ids.begin(), ids.end());
    cache.emplace(word, std::move(ids));
  }

  void encode_piece(const std::string& text, std::vector<int64_t>& out,
                    std::unordered_map<std::string, std::vector<int32_t>>& cache) const {
    std::string s = add_prefix_space && (text.empty() || text[0] != ' ') ? " " + text : text;
    if (!use_regex) return bpe(s, out, cache);
    const std::vector<char32_t> cp = code_points(s);
    std::vector<CharClass> cls(cp.size());
    std::vector<size_t> offset(cp.size() + 1);  // byte offset of each code point
    for (size_t i = 0, at = 0; i < cp.size(); ++i) {
      cls[i] = classify(cp[i]);
      offset[i] = at;
      at += cp[i] < 0x80 ? 1 : cp[i] < 0x800 ? 2 : cp[i] < 0x10000 ? 3 : 4;
    }
    offset[cp.size()] = s.size();
    for (size_t i = 0; i < cp.size();) {
      const size_t len = gpt2_match(cp, cls, i);
      bpe(s.substr(offset[i], offset[i + len] - offset[i]), out, cache);
      i += len;
    }
  }
};

ByteLevelBPE::ByteLevelBPE(const std::string& json_text, const std::string& origin) : impl_(std::make_unique<Impl>()) {
  Impl& t = *impl_;
  t.origin = origin;
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw Error("tokenizer " + origin + " is not valid JSON: " + e.what());
  }
  try {
    if (!j.is_object() || !j.contains("model")) t.fail("no 'model' (not a Hugging Face tokenizer.json)");
    t.read_normalizer(j.value("normalizer", json()));
    t.read_pre_tokenizer(j.value("pre_tokenizer", json()));
    const json decoder = j.value("decoder", json());
    const std::string dtype = decoder.is_null() ? "null" : decoder.at("type").get<std::string>();
    if (dtype != "ByteLevel") t.fail("decoder '" + dtype + "' is not supported (only ByteLevel)");
    t.read_model(j.at("model"));
    t.read_added(j.value("added_tokens", json::array()));
    t.finish_tables();
  } catch (const json::exception& e) {
    t.fail(std::string("unexpected content (") + e.what() + ")");
  }
}

ByteLevelBPE::~ByteLevelBPE() = default;
ByteLevelBPE::ByteLevelBPE(ByteLevelBPE&&) noexcept = default;
ByteLevelBPE& ByteLevelBPE::operator=(ByteLevelBPE&&) noexcept = default;

int64_t ByteLevelBPE::vocab_size() const { return static_cast<int64_t>(impl_->bytes_of.size()); }

std::vector<int64_t> ByteLevelBPE::encode(const std::string& text) const {
  utf8::require_valid(text, "text");
  const Impl& t = *impl_;
  std::vector<int64_t> ids;
  ids.reserve(text.size() / 3);
  std::unordered_map<std::string, std::vector<int32_t>> cache;  // per call: no shared state
  Impl::split_added(text, t.raw_added, [&](size_t b, size_t e, int64_t id) {
    if (id >= 0) return ids.push_back(id);
    const std::string norm = t.normalize(text.substr(b, e - b));
    Impl::split_added(norm, t.normalized_added, [&](size_t nb, size_t ne, int64_t nid) {
      if (nid >= 0) return ids.push_back(nid);
      t.encode_piece(norm.substr(nb, ne - nb), ids, cache);
    });
  });
  return ids;
}

std::string ByteLevelBPE::decode_bytes(const std::vector<int64_t>& ids) const {
  const Impl& t = *impl_;
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= vocab_size() || !t.has_id[static_cast<size_t>(id)])
      throw Error("token id " + std::to_string(id) + " (entry " + std::to_string(i) +
                  ") is not in the tokenizer's vocabulary of " + std::to_string(vocab_size()));
    out += t.bytes_of[static_cast<size_t>(id)];
  }
  return out;
}

#else  // built without nlohmann-json / utf8proc

struct ByteLevelBPE::Impl {};
ByteLevelBPE::ByteLevelBPE(const std::string&, const std::string& origin) {
  throw Error("tokenizer " + origin + " is a tokenizer.json, but this kvcompress::runtime was built "
              "without the byte-level BPE (configure with nlohmann-json3-dev and libutf8proc-dev "
              "installed and KVCOMPRESS_BYTE_LEVEL_BPE=ON)");
}
ByteLevelBPE::~ByteLevelBPE() = default;
ByteLevelBPE::ByteLevelBPE(ByteLevelBPE&&) noexcept = default;
ByteLevelBPE& ByteLevelBPE::operator=(ByteLevelBPE&&) noexcept = default;
int64_t ByteLevelBPE::vocab_size() const { return 0; }
std::vector<int64_t> ByteLevelBPE::encode(const std::string&) const { return {}; }
std::string ByteLevelBPE::decode_bytes(const std::vector<int64_t>&) const { return {}; }

#endif

}  // namespace runtime
}  // namespace kvcompress
