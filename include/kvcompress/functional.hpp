#pragma once
// One function per policy, mirroring the seed's Python functions: compressed copy in, input
// untouched. `kvcompress::h2o_l2_compress(kv, {4, 128, 380})`; skip_layers is the last argument
// (each policy's default when left out). Derived from the built-in list (policies/builtin.hpp).
#include <kvcompress/compressor.hpp>
#include <kvcompress/policies/builtin.hpp>

namespace kvcompress {

/// Compresses with policy `Policy`, the given options and skipped layers.
template <class Policy>
KVCache compress_with(const KVCache& kv, const typename Policy::Options& options = {},
                      std::vector<int64_t> skip_layers = default_skip_layers<Policy>(),
                      const std::vector<LayerInputs>& inputs = {}) {
  return BasicCompressor<Policy>(options, std::move(skip_layers)).compress(kv, inputs);
}

#define KVCOMPRESS_FUNCTION(Type, fname)                                                                  \
  inline KVCache fname##_compress(const KVCache& kv, const policies::Type::Options& options = {},         \
                                  std::vector<int64_t> skip_layers = default_skip_layers<policies::Type>(), \
                                  const std::vector<LayerInputs>& inputs = {}) {                          \
    return compress_with<policies::Type>(kv, options, std::move(skip_layers), inputs);                    \
  }
KVCOMPRESS_BUILTIN_POLICIES(KVCOMPRESS_FUNCTION)
#undef KVCOMPRESS_FUNCTION

}  // namespace kvcompress
