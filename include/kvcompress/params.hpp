#pragma once
// Parameters are declared once per policy, in `visit_params`; the visitors below turn that one
// declaration into validation, spec text, spec parsing and the list of valid keys.
#include <kvcompress/types.hpp>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace kvcompress {
namespace params {

inline constexpr int64_t unbounded = std::numeric_limits<int64_t>::max();

/// `text` with every byte that would not print (control bytes, NUL included, and DEL) written as
/// \xNN, so an error message quoting user input is never cut short or garbled.
inline std::string printable(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (unsigned char c : text) {
    if (c >= 0x20 && c != 0x7f) {
      out += static_cast<char>(c);
    } else {
      const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

/// A value as written in a spec: one word, or a bracketed list of words.
struct SpecValue {
  bool is_list = false;
  std::string word;                // when !is_list
  std::vector<std::string> items;  // when is_list
  std::string text() const {
    if (!is_list) return word;
    std::string s = "[";
    for (size_t i = 0; i < items.size(); ++i) s += (i ? "," : "") + items[i];
    return s + "]";
  }
};

/// Shortest decimal text that reads back as the same double (0.9 -> "0.9", not 0.90000000000000002).
inline std::string format_real(double x) {
  char buf[64];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string s = buf;
  // Keep reals recognisable as reals: 1 -> 1.0.
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

/// A list as specs write it: [0,1], [].
inline std::string format_int_list(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

inline bool parse_int(const std::string& s, int64_t& out) {
  const char* first = s.data();
  if (!s.empty() && s[0] == '+') ++first;
  auto [ptr, ec] = std::from_chars(first, s.data() + s.size(), out);
  return ec == std::errc() && ptr == s.data() + s.size() && first != s.data() + s.size();
}

inline bool parse_real(const std::string& s, double& out) {
  if (s.empty()) return false;
  std::istringstream in(s);
  in.imbue(std::locale::classic());
  in >> out;
  return !in.fail() && in.peek() == std::char_traits<char>::eof() && std::isfinite(out);
}

inline std::string int_range_text(int64_t lo, int64_t hi) {
  if (hi == unbounded) return ">= " + std::to_string(lo);
  return "in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

inline std::string real_range_text(double lo, double hi, bool lo_open, bool hi_open) {
  return std::string(lo_open ? "(" : "[") + format_real(lo) + ", " + format_real(hi) +
         (hi_open ? ")" : "]");
}

/// Checks every field against its declared range; `where` prefixes messages ("l2").
class Validator {
 public:
  explicit Validator(std::string where) : where_(std::move(where)) {}
  void integer(const char* name, int64_t v, int64_t lo, int64_t hi = unbounded) const {
    if (v < lo || v > hi)
      fail(name, "must be " + int_range_text(lo, hi) + ", got " + std::to_string(v));
  }
  void real(const char* name, double v, double lo, double hi, bool lo_open = false,
            bool hi_open = false) const {
    const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
    if (!ok) fail(name, "must be in " + real_range_text(lo, hi, lo_open, hi_open) + ", got " + format_real(v));
  }
  template <class E>
  void choice(const char* name, E v, std::initializer_list<std::pair<const char*, E>> options) const {
    for (const auto& o : options)
      if (o.second == v) return;
    fail(name, "has a value outside its choices");
  }
  void int_list(const char* name, const std::vector<int64_t>& v, int64_t lo) const {
    for (int64_t x : v)
      if (x < lo) fail(name, "entries must be >= " + std::to_string(lo) + ", got " + std::to_string(x));
  }
  [[noreturn]] void fail(const char* name, const std::string& what) const {
    throw Error(where_ + ": parameter '" + name + "' " + what);
  }

 private:
  std::string where_;
};

/// Writes "key=value, key=value" in declaration order.
class SpecWriter {
 public:
  void integer(const char* name, int64_t v, int64_t = 0, int64_t = 0) { add(name, std::to_string(v)); }
  void real(const char* name, double v, double = 0, double = 0, bool = false, bool = false) {
    add(name, format_real(v));
  }
  template <class E>
  void choice(const char* name, E v, std::initializer_list<std::pair<const char*, E>> options) {
    for (const auto& o : options)
      if (o.second == v) return add(name, o.first);
  }
  void int_list(const char* name, const std::vector<int64_t>& v, int64_t = 0) { add(name, format_int_list(v)); }
  const std::string& text() const { return text_; }

 private:
  void add(const char* name, const std::string& value) {
    text_ += (text_.empty() ? "" : ", ") + std::string(name) + "=" + value;
  }
  std::string text_;
};

/// Collects the declared keys (for error messages and documentation).
class NameLister {
 public:
  template <class... Rest>
  void integer(const char* name, Rest&&...) { names.emplace_back(name); }
  template <class... Rest>
  void real(const char* name, Rest&&...) { names.emplace_back(name); }
  template <class E>
  void choice(const char* name, E, std::initializer_list<std::pair<const char*, E>>) { names.emplace_back(name); }
  template <class... Rest>
  void int_list(const char* name, Rest&&...) { names.emplace_back(name); }
  std::vector<std::string> names;
};

/// Assigns parsed spec values to the fields they name, checking each value's type; keys it
/// consumes are removed from `values`, so what remains afterwards is unknown.
class Assigner {
 public:
  Assigner(std::string where, std::map<std::string, SpecValue>& values)
      : where_(std::move(where)), values_(values) {}

  void integer(const char* name, int64_t& field, int64_t = 0, int64_t = 0) {
    if (auto* v = take(name)) field = to_int(name, *v);
  }
  void real(const char* name, double& field, double = 0, double = 0, bool = false, bool = false) {
    if (auto* v = take(name)) {
      if (v->is_list || !parse_real(v->word, field)) bad(name, "a number", *v);
    }
  }
  template <class E>
  void choice(const char* name, E& field, std::initializer_list<std::pair<const char*, E>> options) {
    auto* v = take(name);
    if (!v) return;
    std::string valid;
    for (const auto& o : options) {
      if (!v->is_list && v->word == o.first) {
        field = o.second;
        return;
      }
      valid += (valid.empty() ? "" : ", ") + std::string(o.first);
    }
    bad(name, "one of " + valid, *v);
  }
  void int_list(const char* name, std::vector<int64_t>& field, int64_t = 0) {
    auto* v = take(name);
    if (!v) return;
    if (!v->is_list) bad(name, "a list such as [0,1] or []", *v);
    std::vector<int64_t> out;
    for (const auto& item : v->items) {
      int64_t x = 0;
      if (!parse_int(item, x)) bad(name, "a list of integers", *v);
      out.push_back(x);
    }
    field = std::move(out);
  }

 private:
  const SpecValue* take(const char* name) {
    auto it = values_.find(name);
    if (it == values_.end()) return nullptr;
    held_ = it->second;
    values_.erase(it);
    return &held_;
  }
  int64_t to_int(const char* name, const SpecValue& v) const {
    int64_t x = 0;
    if (v.is_list || !parse_int(v.word, x)) bad(name, "an integer", v);
    return x;
  }
  [[noreturn]] void bad(const char* name, const std::string& wanted, const SpecValue& v) const {
    throw Error(where_ + ": parameter '" + name + "' expects " + wanted + ", got '" + printable(v.text()) + "'");
  }
  std::string where_;
  std::map<std::string, SpecValue>& values_;
  SpecValue held_;
};

}  // namespace params
}  // namespace kvcompress
