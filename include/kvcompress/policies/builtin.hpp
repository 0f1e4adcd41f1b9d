#pragma once
// The one list of built-in policies. The registry (registry.hpp) and the functional API
// (functional.hpp) are derived from it: a new built-in policy is its file plus one line here.
#include <kvcompress/policies/adakv.hpp>
#include <kvcompress/policies/adaptive_l2.hpp>
#include <kvcompress/policies/fix_size_l2.hpp>
#include <kvcompress/policies/h2o.hpp>
#include <kvcompress/policies/h2o_attention.hpp>
#include <kvcompress/policies/h2o_l2.hpp>
#include <kvcompress/policies/l2.hpp>
#include <kvcompress/policies/pyramid_kv.hpp>
#include <kvcompress/policies/recent_only.hpp>
#include <kvcompress/policies/snapkv.hpp>
#include <kvcompress/policies/snapkv_lite.hpp>
#include <kvcompress/policies/streaming_llm.hpp>
#include <kvcompress/policies/tova.hpp>

/// X(policy type in kvcompress::policies, method name = functional API prefix `<name>_compress`).
/// The name is spelled out because C++ cannot make an identifier from Policy::name; the registry
/// checks at start-up that the two agree.
#define KVCOMPRESS_BUILTIN_POLICIES(X) \
  X(L2, l2)                            \
  X(FixSizeL2, fix_size_l2)            \
  X(StreamingLLM, streaming_llm)       \
  X(H2OL2, h2o_l2)                     \
  X(SnapKVLite, snapkv_lite)           \
  X(PyramidKV, pyramid_kv)             \
  X(AdaptiveL2, adaptive_l2)           \
  X(RecentOnly, recent_only)           \
  X(H2OAttention, h2o_attention)       \
  X(H2O, h2o)                          \
  X(SnapKV, snapkv)                    \
  X(TOVA, tova)

/// Built-in policies that hide slots per head (Needs::hides): in the registry like the others,
/// but with no `<name>_compress` function, since a plain K/V copy cannot say which slots a head
/// no longer sees (StaticCache and the runtime keep that).
#define KVCOMPRESS_BUILTIN_HIDING_POLICIES(X) \
  X(AdaKVSnapKV, adakv_snapkv)                \
  X(AdaKVH2O, adakv_h2o)
