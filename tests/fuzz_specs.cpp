// Spec fuzzer: generated and mutated method specs through make_compressor and compress, on
// random caches. A spec is either refused with kvcompress::Error or accepted; an accepted
// compressor must then satisfy, on every cache it is given:
//  - kept positions per (row, head) ascending, distinct and inside the layer; kept keys and
//    values bitwise those of the input at those positions; unselected layers returned as is;
//  - spec() round-trips: make_compressor(spec()) has the same spec;
//  - StaticCache keeps exactly what the functional API keeps (select + apply_selection for the
//    policies that hide slots, whose hidden masks must match too);
//  - the same input gives the same output (the RNG reseeded for fix_size_l2's random strategy).
// Anything else -- another exception type, a crash, a sanitizer report -- is a defect.
//
//   kvcompress_fuzz [--inputs N] [--seed S]     (exit status 1 on any defect)
#include <kvcompress/kvcompress.hpp>

#include <ATen/Parallel.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace kvc = kvcompress;

namespace {

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  bool coin(double p = 0.5) { return std::uniform_real_distribution<double>(0, 1)(g) < p; }
  template <class T>
  const T& pick(const std::vector<T>& v) { return v[static_cast<size_t>(uniform(0, static_cast<int64_t>(v.size()) - 1))]; }
};

// Values a parameter may be given: the edges of every type and some garbage.
std::string value_for(Rng& r, const kvc::params::SpecValue& canonical) {
  static const std::vector<std::string> edges = {
      "0", "1", "2", "3", "-1", "-7", "4", "5", "8", "16", "31", "64", "9223372036854775807", "-9223372036854775808",
      "9223372036854775808", "99999999999999999999", "0.0", "0.5", "1.0", "1.5", "-0.0", "1e308", "1e-308", "nan",
      "inf", "-inf", "0x10", "1e3", "+3", "", "keep_low", "keep_high", "random", "avg", "max", "mean", "per_head",
      "exponential", "linear", "constant", "[]", "[0]", "[0,1]", "[-1]", "[1,1]", "[9223372036854775807]", "[a]",
      "'quoted'", "\"dq\"", "2.0", "1000000", "1e6", "1e7", "0.2", "0.25", "0.9", "1.0000000001"};
  if (r.coin(0.35)) return r.pick(edges);
  if (canonical.is_list) {
    std::string s = "[";
    for (int64_t i = 0, n = r.uniform(0, 3); i < n; ++i) s += (i ? "," : "") + std::to_string(r.uniform(-1, 4));
    return s + "]";
  }
  const std::string& w = canonical.word;
  char* end = nullptr;
  const double d = std::strtod(w.c_str(), &end);
  if (end && *end == '\0' && !w.empty()) {  // a number: near its default, or small
    if (w.find('.') != std::string::npos || w.find('e') != std::string::npos) {
      const double x = r.coin() ? d * std::uniform_real_distribution<double>(0, 2)(r.g)
                                : std::uniform_real_distribution<double>(-0.5, 1.5)(r.g);
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g", x);
      return buf;
    }
    return std::to_string(r.coin() ? r.uniform(0, 48) : static_cast<int64_t>(d) + r.uniform(-3, 3));
  }
  return w;  // a word: its default (the edges above hold the other choices)
}

// Byte-level mutations of a spec text: what a typo, a truncation or binary garbage does.
std::string mutate(Rng& r, std::string s) {
  static const std::string specials = "()[],='\" \t\n\\_-+.0123456789xyz";
  for (int64_t i = 0, n = r.uniform(1, 3); i < n; ++i) {
    const int64_t at = s.empty() ? 0 : r.uniform(0, static_cast<int64_t>(s.size()) - 1);
    switch (r.uniform(0, 4)) {
      case 0: if (!s.empty()) s.erase(static_cast<size_t>(at), 1); break;
      case 1: s.insert(static_cast<size_t>(at), 1, specials[static_cast<size_t>(r.uniform(0, static_cast<int64_t>(specials.size()) - 1))]); break;
      case 2: s.insert(static_cast<size_t>(at), 1, static_cast<char>(r.uniform(0, 255))); break;
      case 3: s = s.substr(0, static_cast<size_t>(at)); break;
      default: if (!s.empty()) s[static_cast<size_t>(at)] = static_cast<char>(r.uniform(0, 255)); break;
    }
  }
  return s;
}

std::string generate_spec(Rng& r, const std::vector<std::string>& methods) {
  if (r.coin(0.03)) return mutate(r, "no_such_method(x=1)");
  const std::string name = r.pick(methods);
  const kvc::ParsedSpec canonical = kvc::parse_spec(kvc::make_compressor(name)->spec());
  std::string s = name;
  if (r.coin(0.1)) return r.coin() ? s : mutate(r, s);
  s += "(";
  bool first = true;
  for (const auto& [key, value] : canonical.args) {
    if (!r.coin(0.6)) continue;
    s += (first ? "" : ", ") + key + "=" + value_for(r, value);
    first = false;
  }
  if (r.coin(0.03)) s += std::string(first ? "" : ", ") + "bogus=1";
  s += ")";
  return r.coin(0.12) ? mutate(r, s) : s;
}

struct Counts {
  int64_t inputs = 0, accepted = 0, refused = 0, compressions = 0, defects = 0;
};

void defect(Counts& c, const std::string& spec, const std::string& what) {
  ++c.defects;
  if (c.defects <= 20)
    std::fprintf(stderr, "DEFECT [%s]: %s\n", kvc::params::printable(spec).c_str(), what.substr(0, what.find('\n')).c_str());
}

// The cache a policy is shown, and the score inputs it may need.
struct Case {
  kvc::KVCache kv;
  std::vector<kvc::LayerInputs> inputs;
};

Case random_case(Rng& r, const kvc::Needs& needs) {
  Case c;
  const int64_t layers = r.uniform(1, 3), batch = r.uniform(1, 2), heads = r.uniform(1, 3), dim = r.uniform(1, 4);
  const at::ScalarType dtype = r.coin(0.15) ? at::kHalf : (r.coin(0.1) ? at::kDouble : at::kFloat);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t seq = r.coin(0.05) ? 0 : r.uniform(1, 48);
    at::Tensor k = at::randn({batch, heads, seq, dim});
    if (r.coin(0.2)) k = k.round();  // ties in key norms and scores
    c.kv.emplace_back(k.to(dtype), at::randn({batch, heads, seq, dim}).to(dtype));
    kvc::LayerInputs in;
    if (needs.attention) in.attention = r.coin(0.2) ? at::ones({batch, heads, seq}) : at::rand({batch, heads, seq});
    if (needs.queries > 0 && seq > 0) in.queries = at::randn({batch, heads, std::min(needs.queries, seq), dim}).to(dtype);
    c.inputs.push_back(in);
  }
  return c;
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a, b);
}

// The invariants on one accepted compressor and one cache.
void check(Counts& counts, const std::string& spec, const kvc::Compressor& c, const Case& in) {
  const kvc::Needs needs = c.needs();
  const int64_t n = static_cast<int64_t>(in.kv.size());
  // Selections, layer by layer, as the functional API makes them.
  std::vector<std::optional<kvc::Selection>> sel;
  at::manual_seed(1234);  // one draw sequence over the layers, as compress() makes it
  for (int64_t l = 0; l < n; ++l) {
    const auto& [keys, values] = in.kv[static_cast<size_t>(l)];
    kvc::LayerView v = kvc::detail::view_with_inputs(in.kv, static_cast<size_t>(l), in.inputs, needs);
    if (needs.hides) v.hidden = at::zeros({keys.size(0), keys.size(1), keys.size(2)}, at::kBool);
    sel.push_back(c.select(v));
    const auto& s = sel.back();
    if (!s) continue;
    const int64_t b = keys.size(0), h = keys.size(1), seq = keys.size(2);
    const at::Tensor pos = s->positions(b, h, keys.device());
    if (pos.size(2) != s->kept() || s->kept() > seq) {
      defect(counts, spec, "layer " + std::to_string(l) + ": keeps " + std::to_string(s->kept()) + " of " + std::to_string(seq));
      return;
    }
    if (pos.numel() > 0 && (pos.min().item<int64_t>() < 0 || pos.max().item<int64_t>() >= seq)) {
      defect(counts, spec, "layer " + std::to_string(l) + ": a kept position outside [0, " + std::to_string(seq) + ")");
      return;
    }
    if (pos.size(2) > 1 && !pos.diff(1, -1).gt(0).all().item<bool>()) {
      defect(counts, spec, "layer " + std::to_string(l) + ": kept positions not ascending and distinct");
      return;
    }
    const kvc::LayerKV kept = kvc::apply_selection(keys, values, *s);
    const at::Tensor idx = pos.unsqueeze(-1).expand({b, h, pos.size(2), keys.size(3)});
    if (!same(kept.first, keys.gather(2, idx)) || !same(kept.second, values.gather(2, idx))) {
      defect(counts, spec, "layer " + std::to_string(l) + ": kept keys/values are not the input's");
      return;
    }
  }
  // The functional API, twice (determinism), where it applies.
  kvc::KVCache out;
  if (!needs.hides) {
    at::manual_seed(1234);
    out = c.compress(in.kv, in.inputs);
    at::manual_seed(1234);
    const kvc::KVCache again = c.compress(in.kv, in.inputs);
    for (int64_t l = 0; l < n; ++l) {
      const size_t i = static_cast<size_t>(l);
      if (!sel[i]) {
        if (!out[i].first.is_same(in.kv[i].first)) defect(counts, spec, "an unselected layer was not returned as is");
      } else if (!same(out[i].first, kvc::apply_selection(in.kv[i].first, in.kv[i].second, *sel[i]).first)) {
        defect(counts, spec, "compress() differs from select() + apply_selection()");
      }
      if (!same(out[i].first, again[i].first) || !same(out[i].second, again[i].second))
        defect(counts, spec, "two runs on the same input differ");
    }
  }
  // StaticCache: the same cache appended, then compressed in place.
  const auto& k0 = in.kv[0].first;
  std::vector<int64_t> cap;
  for (const auto& [k, v] : in.kv) cap.push_back(std::max<int64_t>(1, k.size(2)));
  bool uniform_shape = true;
  for (const auto& [k, v] : in.kv)
    uniform_shape &= k.size(0) == k0.size(0) && k.size(1) == k0.size(1) && k.size(3) == k0.size(3);
  if (!uniform_shape) return;
  kvc::StaticCache cache(n, k0.size(0), k0.size(1), k0.size(3), cap, k0.options());
  if (needs.attention) cache.track_attention();
  kvc::RecentQueries recent;
  for (int64_t l = 0; l < n; ++l) {
    const auto& [k, v] = in.kv[static_cast<size_t>(l)];
    if (k.size(2) > 0) cache.append(l, k, v, 0);
    if (needs.attention && k.size(2) > 0)
      cache.accumulate_attention(l, in.inputs[static_cast<size_t>(l)].attention, 1.0);
  }
  if (needs.queries > 0) {
    // RecentQueries has one window for every layer: only caches whose layers agree qualify.
    for (const auto& li : in.inputs)
      if (!li.queries.defined() || li.queries.size(2) != in.inputs[0].queries.size(2)) return;
    for (int64_t l = 0; l < n; ++l)
      if (in.kv[static_cast<size_t>(l)].first.size(2) != k0.size(2)) return;
    for (const auto& li : in.inputs) recent.per_layer.push_back(li.queries);
    const int64_t w = in.inputs[0].queries.size(2);
    recent.positions = at::arange(k0.size(2) - w, k0.size(2), at::kLong);
  }
  at::manual_seed(1234);
  cache.compress(c, nullptr, needs.queries > 0 ? &recent : nullptr);
  ++counts.compressions;
  const kvc::KVCache view = cache.view();
  for (int64_t l = 0; l < n; ++l) {
    const size_t i = static_cast<size_t>(l);
    const kvc::LayerKV want = sel[i] ? kvc::apply_selection(in.kv[i].first, in.kv[i].second, *sel[i]) : in.kv[i];
    if (!same(view[i].first, want.first) || !same(view[i].second, want.second)) {
      defect(counts, spec, "layer " + std::to_string(l) + ": StaticCache differs from the functional API");
      return;
    }
    if (needs.hides && sel[i] && sel[i]->hidden().defined() && !same(cache.hidden(l), sel[i]->hidden()))
      defect(counts, spec, "layer " + std::to_string(l) + ": StaticCache's hidden slots differ from the selection's");
  }
}

}  // namespace

int main(int argc, char** argv) {
  int64_t inputs = 10000;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--inputs" && i + 1 < argc) inputs = std::atoll(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: kvcompress_fuzz [--inputs N] [--seed S]\n");
      return 2;
    }
  }
  at::set_num_threads(1);
  Rng r(seed);
  at::manual_seed(static_cast<int64_t>(seed));
  const std::vector<std::string> methods = kvc::list_methods();
  Counts counts;
  for (int64_t i = 0; i < inputs; ++i) {
    const std::string spec = generate_spec(r, methods);
    ++counts.inputs;
    std::unique_ptr<kvc::Compressor> c;
    try {
      c = kvc::make_compressor(spec);
    } catch (const kvc::Error& e) {
      ++counts.refused;
      if (std::strlen(e.what()) == 0) defect(counts, spec, "refused with an empty message");
      continue;
    } catch (const std::exception& e) {
      defect(counts, spec, std::string("make_compressor threw a non-kvcompress exception: ") + e.what());
      continue;
    }
    ++counts.accepted;
    try {
      const std::string canonical = c->spec();
      if (kvc::make_compressor(canonical)->spec() != canonical) defect(counts, spec, "spec() does not round-trip: " + canonical);
      for (int k = 0; k < 2; ++k) check(counts, spec, *c, random_case(r, c->needs()));
    } catch (const std::exception& e) {
      defect(counts, spec, std::string("an accepted spec failed: ") + e.what());
    }
  }
  std::printf("kvcompress_fuzz: %lld inputs (seed %llu): %lld accepted, %lld refused with kvcompress::Error, "
              "%lld cache compressions, %lld defects\n",
              static_cast<long long>(counts.inputs), static_cast<unsigned long long>(seed),
              static_cast<long long>(counts.accepted), static_cast<long long>(counts.refused),
              static_cast<long long>(counts.compressions), static_cast<long long>(counts.defects));
  return counts.defects == 0 ? 0 : 1;
}
