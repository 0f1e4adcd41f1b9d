#pragma once
// The common mechanics around a policy: parameter validation, skip_layers, input checks, and
// applying the policy's selection to every layer.
#include <kvcompress/apply.hpp>
#include <kvcompress/params.hpp>
#include <kvcompress/validate.hpp>

#include <algorithm>
#include <optional>
#include <string>

namespace kvcompress {

/// The type-erased interface the registry hands out.
class Compressor {
 public:
  virtual ~Compressor() = default;
  /// Returns the compressed cache; the input is never modified. Unchanged layers are returned
  /// as the same tensors; compressed layers are new tensors.
  virtual KVCache compress(const KVCache& kv) const = 0;
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
};

/// A policy's canonical spec text for the given options.
template <class Policy>
std::string spec_of(const typename Policy::Options& options) {
  params::SpecWriter w;
  Policy::visit_params(options, w);
  return std::string(Policy::name) + "(" + w.text() + ")";
}

/// Throws kvcompress::Error if any option of `Policy` is out of its declared range.
template <class Policy>
void validate_options(const typename Policy::Options& options) {
  params::Validator v(Policy::name);
  Policy::visit_params(options, v);
}

/// A compressor for one policy type, usable directly in templated code (no virtual call per
/// layer) or through the `Compressor` interface. A policy provides `Options` (with a
/// `skip_layers` member), `name`, `visit_params(options, visitor)` and
/// `select(options, LayerView) -> std::optional<Selection>`.
template <class Policy>
class BasicCompressor final : public Compressor {
 public:
  using policy_type = Policy;
  using Options = typename Policy::Options;

  explicit BasicCompressor(Options options = Options()) : options_(std::move(options)) {
    validate_options<Policy>(options_);
  }

  const Options& options() const { return options_; }

  std::optional<Selection> select(const LayerView& layer) const override {
    const auto& skip = options_.skip_layers;
    if (std::find(skip.begin(), skip.end(), layer.layer) != skip.end()) return std::nullopt;
    return Policy::select(options_, layer);
  }

  KVCache compress(const KVCache& kv) const override {
    detail::validate_cache(kv, name());
    KVCache out;
    out.reserve(kv.size());
    const int64_t num_layers = static_cast<int64_t>(kv.size());
    for (int64_t i = 0; i < num_layers; ++i) {
      const auto& [keys, values] = kv[static_cast<size_t>(i)];
      std::optional<Selection> s = select(LayerView{keys, i, num_layers});
      out.push_back(s ? apply_selection(keys, values, *s) : LayerKV{keys, values});
    }
    return out;
  }

  std::string name() const override { return Policy::name; }
  std::string spec() const override { return spec_of<Policy>(options_); }
  std::vector<int64_t> skip_layers() const override { return options_.skip_layers; }

 private:
  Options options_;
};

}  // namespace kvcompress
