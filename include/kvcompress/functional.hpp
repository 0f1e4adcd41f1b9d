#pragma once
// One function per policy, mirroring the seed's Python functions: compressed copy in, input
// untouched. `kvcompress::h2o_l2_compress(kv, {4, 128, 380})`.
#include <kvcompress/compressor.hpp>
#include <kvcompress/policies/adaptive_l2.hpp>
#include <kvcompress/policies/fix_size_l2.hpp>
#include <kvcompress/policies/h2o_l2.hpp>
#include <kvcompress/policies/l2.hpp>
#include <kvcompress/policies/pyramid_kv.hpp>
#include <kvcompress/policies/recent_only.hpp>
#include <kvcompress/policies/snapkv_lite.hpp>
#include <kvcompress/policies/streaming_llm.hpp>

namespace kvcompress {

/// Compresses with policy `Policy` and the given options.
template <class Policy>
KVCache compress_with(const KVCache& kv, const typename Policy::Options& options = {}) {
  return BasicCompressor<Policy>(options).compress(kv);
}

inline KVCache l2_compress(const KVCache& kv, const L2Options& o = {}) {
  return compress_with<policies::L2>(kv, o);
}
inline KVCache fix_size_l2_compress(const KVCache& kv, const FixSizeL2Options& o = {}) {
  return compress_with<policies::FixSizeL2>(kv, o);
}
inline KVCache streaming_llm_compress(const KVCache& kv, const StreamingLLMOptions& o = {}) {
  return compress_with<policies::StreamingLLM>(kv, o);
}
inline KVCache h2o_l2_compress(const KVCache& kv, const H2OL2Options& o = {}) {
  return compress_with<policies::H2OL2>(kv, o);
}
inline KVCache snapkv_lite_compress(const KVCache& kv, const SnapKVLiteOptions& o = {}) {
  return compress_with<policies::SnapKVLite>(kv, o);
}
inline KVCache pyramid_kv_compress(const KVCache& kv, const PyramidKVOptions& o = {}) {
  return compress_with<policies::PyramidKV>(kv, o);
}
inline KVCache adaptive_l2_compress(const KVCache& kv, const AdaptiveL2Options& o = {}) {
  return compress_with<policies::AdaptiveL2>(kv, o);
}
inline KVCache recent_only_compress(const KVCache& kv, const RecentOnlyOptions& o = {}) {
  return compress_with<policies::RecentOnly>(kv, o);
}

}  // namespace kvcompress
