#pragma once
// kvcompress::runtime: a contract TorchScript model (model.hpp), one decode interface over the
// concatenating and the fixed-capacity cache (decoder.hpp) with the position rules
// (positions.hpp), evaluation and generation written once over it (evaluate.hpp), every run
// as a row of one batch (one_pass.hpp), the
// tokenizers (tokenizer.hpp: SentencePiece and byte-level BPE), and device-clock timing and memory. Link the CMake target
// kvcompress::runtime (find_package(kvcompress COMPONENTS runtime)); it carries CUDA support
// when LibTorch has it.
#include <kvcompress/kvcompress.hpp>
#include <kvcompress/runtime/decoder.hpp>
#include <kvcompress/runtime/device.hpp>
#include <kvcompress/runtime/evaluate.hpp>
#include <kvcompress/runtime/memory.hpp>
#include <kvcompress/runtime/model.hpp>
#include <kvcompress/runtime/one_pass.hpp>
#include <kvcompress/runtime/positions.hpp>
#include <kvcompress/runtime/byte_level_bpe.hpp>
#include <kvcompress/runtime/sentencepiece_bpe.hpp>
#include <kvcompress/runtime/token_file.hpp>
#include <kvcompress/runtime/tokenizer.hpp>
#include <kvcompress/runtime/timeline.hpp>
