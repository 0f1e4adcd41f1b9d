#pragma once
// Method names and spec strings -> compressors. A spec is `name` or `name(key=value, ...)`
// with numbers, bare words (strategy=keep_low) and lists (skip_layers=[0,1], skip_layers=[]).
#include <kvcompress/compressor.hpp>
#include <kvcompress/policies/builtin.hpp>

#include <cctype>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace kvcompress {

/// A parsed spec: the method name as written and its key=value arguments.
struct ParsedSpec {
  std::string name;
  std::map<std::string, params::SpecValue> args;
};

namespace detail {

class SpecParser {
 public:
  explicit SpecParser(const std::string& text) : s_(text) {}

  ParsedSpec parse() {
    ParsedSpec out;
    skip_space();
    out.name = word("a method name");
    skip_space();
    if (at_end()) return out;
    expect('(');
    skip_space();
    if (peek() == ')') {
      ++pos_;
    } else {
      for (;;) {
        skip_space();
        std::string key = word("a parameter name");
        skip_space();
        expect('=');
        skip_space();
        params::SpecValue value = this->value();
        if (!out.args.emplace(key, std::move(value)).second)
          fail("parameter '" + key + "' is given twice");
        skip_space();
        if (peek() == ',') { ++pos_; continue; }
        expect(')');
        break;
      }
    }
    skip_space();
    if (!at_end()) fail("unexpected text after ')'");
    return out;
  }

 private:
  params::SpecValue value() {
    params::SpecValue v;
    if (peek() != '[') {
      v.word = word("a value");
      return v;
    }
    v.is_list = true;
    ++pos_;
    skip_space();
    if (peek() == ']') { ++pos_; return v; }
    for (;;) {
      skip_space();
      v.items.push_back(word("a list item"));
      skip_space();
      if (peek() == ',') { ++pos_; continue; }
      expect(']');
      return v;
    }
  }
  static bool word_char(char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-' || c == '+';
  }
  std::string word(const char* what) {
    if (peek() == '\'' || peek() == '"') {  // a quoted word, as Python code would write it
      const char quote = s_[pos_++];
      const size_t start = pos_;
      while (!at_end() && s_[pos_] != quote) ++pos_;
      if (at_end()) fail(std::string("unterminated quote in ") + what);
      std::string w = s_.substr(start, pos_ - start);
      ++pos_;
      if (w.empty()) fail(std::string("expected ") + what);
      return w;
    }
    const size_t start = pos_;
    while (!at_end() && word_char(s_[pos_])) ++pos_;
    if (pos_ == start) fail(std::string("expected ") + what);
    return s_.substr(start, pos_ - start);
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  void skip_space() { while (!at_end() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_; }
  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }
  [[noreturn]] void fail(const std::string& what) const {
    throw Error("bad method spec '" + params::printable(s_) + "': " + what + " at position " + std::to_string(pos_));
  }
  const std::string& s_;
  size_t pos_ = 0;
};

}  // namespace detail

/// Parses `name` / `name(key=value, ...)`; throws kvcompress::Error on malformed text.
inline ParsedSpec parse_spec(const std::string& spec) { return detail::SpecParser(spec).parse(); }

namespace detail {
template <class P, class = void>
struct has_aliases : std::false_type {};
template <class P>
struct has_aliases<P, std::void_t<decltype(P::aliases())>> : std::true_type {};
}  // namespace detail

/// Other names a policy answers to (`Policy::aliases()` when declared).
template <class Policy>
std::vector<std::string> aliases_of() {
  if constexpr (detail::has_aliases<Policy>::value) {
    return Policy::aliases();
  } else {
    return {};
  }
}

/// Builds a compressor for `Policy` from parsed arguments: unknown keys are an error that lists
/// the valid ones; values are type-checked, then range-checked. `skip_layers` is the
/// compressor's (every policy accepts it).
template <class Policy>
std::unique_ptr<Compressor> make_policy_compressor(std::map<std::string, params::SpecValue> args) {
  typename Policy::Options options;
  std::vector<int64_t> skip = default_skip_layers<Policy>();
  params::Assigner assign(Policy::name, args);
  Policy::visit_params(options, assign);
  assign.int_list("skip_layers", skip);
  if (!args.empty()) {
    params::NameLister names;
    Policy::visit_params(options, names);
    names.names.emplace_back("skip_layers");
    std::string valid;
    for (const auto& n : names.names) valid += (valid.empty() ? "" : ", ") + n;
    throw Error(std::string(Policy::name) + ": unknown parameter '" + params::printable(args.begin()->first) +
                "'; valid parameters: " + valid);
  }
  return std::make_unique<BasicCompressor<Policy>>(std::move(options), std::move(skip));
}

/// Name -> factory. Built-in policies are registered on first use; users add their own with
/// `register_policy<MyPolicy>()`.
class Registry {
 public:
  using Factory = std::function<std::unique_ptr<Compressor>(std::map<std::string, params::SpecValue>)>;

  static Registry& instance() {
    static Registry registry;
    return registry;
  }

  /// Registers `factory` under `name` (and aliases); a name already taken is an error.
  void add(const std::string& name, Factory factory, const std::vector<std::string>& aliases = {}) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (name.empty()) throw Error("register_policy: empty method name");
    for (const auto& n : aliases) check_free(n);
    check_free(name);
    factories_[name] = std::move(factory);
    for (const auto& a : aliases) aliases_[a] = name;
  }

  std::vector<std::string> names() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> out;
    for (const auto& kv : factories_) out.push_back(kv.first);
    return out;
  }

  std::unique_ptr<Compressor> make(ParsedSpec parsed) const {
    Factory factory;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::string name = parsed.name;
      if (auto a = aliases_.find(name); a != aliases_.end()) name = a->second;
      auto it = factories_.find(name);
      if (it == factories_.end()) {
        std::string known;
        for (const auto& kv : factories_) known += (known.empty() ? "" : ", ") + kv.first;
        throw Error("unknown method '" + params::printable(parsed.name) + "'; known methods: " + known);
      }
      factory = it->second;
    }
    return factory(std::move(parsed.args));
  }

 private:
  Registry() {
#define KVCOMPRESS_REGISTER(Type, fname)                                                         \
  check_builtin_name(policies::Type::name, #fname);                                             \
  add(policies::Type::name, make_policy_compressor<policies::Type>, aliases_of<policies::Type>());
    KVCOMPRESS_BUILTIN_POLICIES(KVCOMPRESS_REGISTER)
    KVCOMPRESS_BUILTIN_HIDING_POLICIES(KVCOMPRESS_REGISTER)
#undef KVCOMPRESS_REGISTER
  }
  static void check_builtin_name(const char* name, const char* listed) {
    if (std::string(name) != listed)
      throw Error(std::string("kvcompress: built-in policy list names '") + listed + "' for policy '" + name + "'");
  }
  void check_free(const std::string& n) const {
    if (factories_.count(n) || aliases_.count(n))
      throw Error("register_policy: method name '" + params::printable(n) + "' is already registered");
  }
  mutable std::mutex mutex_;
  std::map<std::string, Factory> factories_;
  std::map<std::string, std::string> aliases_;
};

/// Canonical names of every registered method, sorted.
inline std::vector<std::string> list_methods() { return Registry::instance().names(); }

/// `make_compressor("h2o_l2(heavy_hitter_size=128, skip_layers=[0,1])")`.
inline std::unique_ptr<Compressor> make_compressor(const std::string& spec) {
  return Registry::instance().make(parse_spec(spec));
}

/// The same from an already parsed spec (e.g. one whose arguments a driver has completed).
inline std::unique_ptr<Compressor> make_compressor(ParsedSpec spec) {
  return Registry::instance().make(std::move(spec));
}

/// Makes a user's policy available to make_compressor under `Policy::name` (and aliases).
template <class Policy>
void register_policy(const std::vector<std::string>& aliases = {}) {
  Registry::instance().add(Policy::name, make_policy_compressor<Policy>, aliases);
}

}  // namespace kvcompress
