#pragma once
// The common mechanics around a policy, written once: parameter validation, skip_layers, what
// the policy needs besides keys (and a clear error when it is missing), input checks, and
// applying the policy's selection to every layer.
#include <kvcompress/apply.hpp>
#include <kvcompress/params.hpp>
#include <kvcompress/validate.hpp>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>

namespace kvcompress {

/// Per-layer score inputs for Compressor::compress (LayerView's optional fields, same shapes).
/// key_positions may be left undefined for a cache that was never compressed (slot i holds
/// token i); query_positions likewise (the queries are those of the last tokens).
struct LayerInputs {
  at::Tensor attention, queries, query_positions, key_positions;
};

/// The type-erased interface the registry hands out.
class Compressor {
 public:
  virtual ~Compressor() = default;
  /// Returns the compressed cache; the input is never modified. A policy that hides slots
  /// (Needs::hides) is refused: only a cache that keeps them hidden can hold its result. Unchanged layers are returned
  /// as the same tensors; compressed layers are new tensors. A policy that needs scores gets
  /// them from `inputs` (one entry per layer).
  virtual KVCache compress(const KVCache& kv, const std::vector<LayerInputs>& inputs = {}) const = 0;
  /// Which tokens of one layer to keep; std::nullopt = keep the layer unchanged (skipped, or
  /// within budget). Exposed for callers that move memory themselves (an in-place cache) or
  /// track positions.
  virtual std::optional<Selection> select(const LayerView& layer) const = 0;
  /// Canonical method name, e.g. "streaming_llm".
  virtual std::string name() const = 0;
  /// Canonical spec with every parameter, e.g. "streaming_llm(start_size=4, recent_size=508, skip_layers=[])".
  virtual std::string spec() const = 0;
  /// Layers this compressor never touches.
  virtual std::vector<int64_t> skip_layers() const = 0;
  /// What the policy needs besides keys.
  virtual Needs needs() const { return {}; }
};

namespace detail {

template <class P, class = void>
struct has_default_skip : std::false_type {};
template <class P>
struct has_default_skip<P, std::void_t<decltype(P::default_skip_layers())>> : std::true_type {};
template <class P, class = void>
struct has_needs : std::false_type {};
template <class P>
struct has_needs<P, std::void_t<decltype(P::needs(std::declval<const typename P::Options&>()))>>
    : std::true_type {};

// A name the compressor owns; a policy declaring it would be set twice.
inline void check_not_declared(const char* policy, const std::vector<std::string>& names) {
  if (std::find(names.begin(), names.end(), "skip_layers") != names.end())
    throw Error(std::string(policy) + ": declares a 'skip_layers' parameter, but skip_layers belongs to the "
                                      "compressor (BasicCompressor's second argument): remove it from the "
                                      "policy's Options and visit_params");
}

inline std::string needs_text(const Needs& n) {
  std::string s;
  auto add = [&](const std::string& what) { s += (s.empty() ? "" : " and ") + what; };
  if (n.values) add("the values");
  if (n.attention) add("the accumulated attention of every cached token (LayerView::attention)");
  if (n.queries > 0)
    add("the last " + std::to_string(n.queries) +
        " queries with their positions (LayerView::queries, query_positions, key_positions)");
  if (n.hides) add("the slots it hid before (LayerView::hidden)");
  return s;
}

// The score inputs `needs` asks for are present and shaped like the layer.
inline void check_inputs(const LayerView& v, const Needs& n, const std::string& who) {
  const std::string where = who + ": layer " + std::to_string(v.layer) + ": ";
  auto missing = [&](const char* what) {
    throw Error(where + "needs " + needs_text(n) + ", but " + what +
                " was not provided -- run it through the kvcompress runtime with a model that has contract "
                "version 3's scored methods (docs/MODEL_CONTRACT.md), or pass Compressor::compress "
                "its LayerInputs");
  };
  const int64_t b = v.keys.size(0), h = v.keys.size(1), s = v.keys.size(2);
  auto per_slot = [&](const at::Tensor& t, const char* what) {
    if (t.dim() != 3 || t.size(0) != b || t.size(1) != h || t.size(2) != s)
      throw Error(where + what + " must be [" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                  std::to_string(s) + "] like the keys, got " + shape_text(t));
    if (t.device() != v.keys.device())
      throw Error(where + what + " is on " + t.device().str() + " but the keys are on " + v.keys.device().str());
  };
  if (n.values) {
    if (!v.values.defined()) missing("the values");
    if (v.values.sizes() != v.keys.sizes())
      throw Error(where + "values " + shape_text(v.values) + " differ in shape from keys " + shape_text(v.keys));
  }
  if (n.attention) {
    if (!v.attention.defined()) missing("the accumulated attention");
    per_slot(v.attention, "accumulated attention");
    if (!at::isFloatingType(v.attention.scalar_type()))
      throw Error(where + "accumulated attention must be floating point");
  }
  if (n.queries > 0) {
    if (!v.queries.defined()) missing("the queries");
    if (!v.query_positions.defined()) missing("the query positions");
    if (!v.key_positions.defined()) missing("the key positions");
    const at::Tensor& q = v.queries;
    if (q.dim() != 4 || q.size(0) != b || q.size(1) != h || q.size(2) < 1 || q.size(3) != v.keys.size(3))
      throw Error(where + "queries must be [" + std::to_string(b) + ", " + std::to_string(h) + ", W >= 1, " +
                  std::to_string(v.keys.size(3)) + "], got " + shape_text(q));
    if (q.device() != v.keys.device())
      throw Error(where + "queries are on " + q.device().str() + " but the keys are on " + v.keys.device().str());
    if (v.query_positions.dim() != 1 || v.query_positions.size(0) != q.size(2) ||
        v.query_positions.scalar_type() != at::kLong)
      throw Error(where + "query_positions must be int64 [" + std::to_string(q.size(2)) + "], got " +
                  shape_text(v.query_positions));
    per_slot(v.key_positions, "key_positions");
    if (v.key_positions.scalar_type() != at::kLong) throw Error(where + "key_positions must be int64");
  }
  if (n.hides) {
    if (!v.hidden.defined()) missing("the hidden slots");
    per_slot(v.hidden, "hidden");
    if (v.hidden.scalar_type() != at::kBool) throw Error(where + "hidden must be bool");
  }
}

// A policy's selection is one the compressor can stand behind: hidden slots only from a policy
// that declares them, shaped like the kept slots.
inline void check_hidden(const Selection& s, const LayerView& v, const Needs& n, const std::string& who) {
  const at::Tensor& m = s.hidden();
  if (!m.defined()) return;
  const std::string where = who + ": layer " + std::to_string(v.layer) + ": ";
  if (!n.hides)
    throw Error(where + "the selection hides slots (Selection::hide) but the policy does not declare "
                        "Needs::hides, so no cache would keep them hidden");
  if (m.scalar_type() != at::kBool || m.dim() != 3 || m.size(0) != v.keys.size(0) || m.size(1) != v.keys.size(1) ||
      m.size(2) != s.kept())
    throw Error(where + "the hidden mask must be bool [" + std::to_string(v.keys.size(0)) + ", " +
                std::to_string(v.keys.size(1)) + ", " + std::to_string(s.kept()) + "] (one flag per kept slot), got " +
                shape_text(m));
}

// LayerView of layer i of `kv` with whatever `inputs` holds for it; positions default to those
// of a cache that was never compressed.
inline LayerView view_with_inputs(const KVCache& kv, size_t i, const std::vector<LayerInputs>& inputs,
                                  const Needs& needs) {
  const at::Tensor& keys = kv[i].first;
  LayerView v{keys, static_cast<int64_t>(i), static_cast<int64_t>(kv.size())};
  if (needs.values) v.values = kv[i].second;
  if (i >= inputs.size()) return v;
  const LayerInputs& in = inputs[i];
  v.attention = in.attention;
  v.queries = in.queries;
  v.query_positions = in.query_positions;
  v.key_positions = in.key_positions;
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(keys.device());
  if (v.queries.defined() && v.queries.dim() == 4 && !v.key_positions.defined())
    v.key_positions = at::arange(keys.size(2), long_opts).expand({keys.size(0), keys.size(1), keys.size(2)});
  if (v.queries.defined() && v.queries.dim() == 4 && !v.query_positions.defined())
    v.query_positions = at::arange(keys.size(2) - v.queries.size(2), keys.size(2), at::kLong);
  return v;
}

}  // namespace detail

/// Layers a `Policy` leaves whole unless told otherwise: `Policy::default_skip_layers()` when it
/// declares one, none otherwise.
template <class Policy>
std::vector<int64_t> default_skip_layers() {
  if constexpr (detail::has_default_skip<Policy>::value) {
    return Policy::default_skip_layers();
  } else {
    return {};
  }
}

/// What `Policy` with `options` needs besides keys: `Policy::needs(options)` when declared.
template <class Policy>
Needs needs_of(const typename Policy::Options& options) {
  if constexpr (detail::has_needs<Policy>::value) {
    return Policy::needs(options);
  } else {
    (void)options;
    return {};
  }
}

/// A policy's canonical spec text for the given options and skipped layers.
template <class Policy>
std::string spec_of(const typename Policy::Options& options,
                    const std::vector<int64_t>& skip_layers = default_skip_layers<Policy>()) {
  params::SpecWriter w;
  Policy::visit_params(options, w);
  w.int_list("skip_layers", skip_layers);
  return std::string(Policy::name) + "(" + w.text() + ")";
}

/// Throws kvcompress::Error if any option of `Policy` is out of its declared range.
template <class Policy>
void validate_options(const typename Policy::Options& options) {
  params::Validator v(Policy::name);
  Policy::visit_params(options, v);
}

/// A compressor for one policy type, usable directly in templated code (no virtual call per
/// layer) or through the `Compressor` interface. A policy provides `Options`, `name`,
/// `visit_params(options, visitor)` and `select(options, LayerView) -> std::optional<Selection>`;
/// optionally `default_skip_layers()` and `needs(options) -> Needs`. Layers in skip_layers are
/// never shown to the policy.
template <class Policy>
class BasicCompressor final : public Compressor {
 public:
  using policy_type = Policy;
  using Options = typename Policy::Options;

  explicit BasicCompressor(Options options = Options(),
                           std::vector<int64_t> skip_layers = default_skip_layers<Policy>())
      : options_(std::move(options)), skip_layers_(std::move(skip_layers)) {
    params::NameLister names;
    Policy::visit_params(options_, names);
    detail::check_not_declared(Policy::name, names.names);
    validate_options<Policy>(options_);
    params::Validator(Policy::name).int_list("skip_layers", skip_layers_, 0);
    needs_ = needs_of<Policy>(options_);
  }

  const Options& options() const { return options_; }

  std::optional<Selection> select(const LayerView& layer) const override {
    if (std::find(skip_layers_.begin(), skip_layers_.end(), layer.layer) != skip_layers_.end()) return std::nullopt;
    if (layer.seq() == 0) return std::nullopt;  // nothing to choose from (and no scores to ask for)
    if (needs_.values || needs_.scores() || needs_.hides) detail::check_inputs(layer, needs_, Policy::name);
    std::optional<Selection> s = Policy::select(options_, layer);
    if (s) detail::check_hidden(*s, layer, needs_, Policy::name);
    return s;
  }

  KVCache compress(const KVCache& kv, const std::vector<LayerInputs>& inputs = {}) const override {
    detail::validate_cache(kv, name());
    if (needs_.hides)
      throw Error(spec() + " gives heads different budgets by hiding slots, which a plain K/V copy cannot "
                           "express: compress a kvcompress::StaticCache (it keeps the hidden slots and "
                           "slot_bias for the model's attention) or run it through the kvcompress runtime");
    if (!inputs.empty() && inputs.size() != kv.size())
      throw Error(name() + ": " + std::to_string(inputs.size()) + " LayerInputs for " + std::to_string(kv.size()) +
                  " layers");
    KVCache out;
    out.reserve(kv.size());
    for (size_t i = 0; i < kv.size(); ++i) {
      const auto& [keys, values] = kv[i];
      std::optional<Selection> s = select(detail::view_with_inputs(kv, i, inputs, needs_));
      out.push_back(s ? apply_selection(keys, values, *s) : LayerKV{keys, values});
    }
    return out;
  }

  std::string name() const override { return Policy::name; }
  std::string spec() const override { return spec_of<Policy>(options_, skip_layers_); }
  std::vector<int64_t> skip_layers() const override { return skip_layers_; }
  Needs needs() const override { return needs_; }

 private:
  Options options_;
  std::vector<int64_t> skip_layers_;
  Needs needs_;
};

/// Tokens `compressor` leaves in layer `layer` of `num_layers` when it holds `seq`. Every
/// selection's size depends on the lengths only, never on the values, so this runs the policy on
/// a probe (zero keys, zero scores): what a fixed-capacity cache needs to size its buffers.
inline int64_t kept_tokens(const Compressor& compressor, int64_t layer, int64_t num_layers, int64_t seq) {
  const at::Tensor keys = at::zeros({1, 1, seq, 1});
  LayerView v{keys, layer, num_layers};
  const Needs needs = compressor.needs();
  if (needs.values) v.values = keys;
  if (needs.attention) v.attention = at::zeros({1, 1, seq});
  if (needs.queries > 0 && seq > 0) {
    v.queries = at::zeros({1, 1, 1, 1});
    v.query_positions = at::full({1}, seq - 1, at::kLong);
    v.key_positions = at::arange(seq, at::kLong).view({1, 1, seq});
  }
  if (needs.hides) v.hidden = at::zeros({1, 1, seq}, at::kBool);
  std::optional<Selection> s = compressor.select(v);
  return s ? s->kept() : seq;
}

}  // namespace kvcompress
