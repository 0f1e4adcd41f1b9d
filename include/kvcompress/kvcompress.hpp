#pragma once
// kvcompress: KV-cache compression policies on LibTorch tensors. The whole public API.
#include <kvcompress/version.hpp>
#include <kvcompress/types.hpp>
#include <kvcompress/selection.hpp>
#include <kvcompress/apply.hpp>
#include <kvcompress/scoring.hpp>
#include <kvcompress/compressor.hpp>
#include <kvcompress/functional.hpp>
#include <kvcompress/registry.hpp>
#include <kvcompress/cache.hpp>
