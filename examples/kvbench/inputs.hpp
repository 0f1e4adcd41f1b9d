#pragma once
// kvbench's inputs: texts (tokenized with the tokenizer the model embeds) or token-id files
// (runtime/token_file.hpp), the bundled defaults, and their checks against the model.
#include "cli.hpp"

#include <kvcompress/runtime/model.hpp>
#include <kvcompress/runtime/token_file.hpp>
#include <kvcompress/runtime/tokenizer.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace kvbench {

inline std::vector<int64_t> tokenize_text(const std::string& path, const rt::Tokenizer& tokenizer) {
  const std::string text = kvtools::read_file(path, "text");
  try {
    return tokenizer.encode(text);
  } catch (const kvc::Error& e) {
    fail(std::string(e.what()) + " (in " + kvc::params::printable(path) + ")");
  }
}

inline std::vector<std::string> sorted_files(const std::string& dir, const std::string& ext) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.path().extension() == ext) out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

struct Sample {
  std::string source;
  std::vector<int64_t> tokens;
};

inline std::vector<Sample> load_samples(Options& o, const rt::ContractModel& model) {
  const bool bundled = o.texts.empty() && o.token_files.empty();
  if (bundled) {
    const bool use_text = model.has_tokenizer();
    if (use_text) o.texts = sorted_files(std::string(KVC_DATA_DIR) + "/eval_text", ".txt");
    else o.token_files = sorted_files(std::string(KVC_DATA_DIR) + "/eval_tokens", ".ids");
    if (o.texts.empty() && o.token_files.empty())
      fail("no input given and no bundled eval data found under " + std::string(KVC_DATA_DIR));
  }
  const auto& inputs = o.texts.empty() ? o.token_files : o.texts;
  if (o.samples == 0) o.samples = bundled ? std::min<int64_t>(2, static_cast<int64_t>(inputs.size()))
                                          : static_cast<int64_t>(inputs.size());
  if (static_cast<int64_t>(inputs.size()) < o.samples)
    fail("--samples " + std::to_string(o.samples) + " but only " + std::to_string(inputs.size()) +
         " input file(s)");
  std::unique_ptr<rt::Tokenizer> tokenizer;  // the model's; an error names the remedies when it has none
  if (!o.texts.empty()) tokenizer = model.tokenizer();
  std::vector<Sample> samples;
  for (int64_t s = 0; s < o.samples; ++s) {
    const std::string& path = inputs[static_cast<size_t>(s)];
    std::vector<int64_t> ids = tokenizer ? tokenize_text(path, *tokenizer) : rt::read_token_file(path);
    if (o.max_tokens > 0 && static_cast<int64_t>(ids.size()) > o.max_tokens) ids.resize(static_cast<size_t>(o.max_tokens));
    if (ids.size() < 2) fail("input " + path + " has fewer than 2 tokens");
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= model.info().vocab_size)
        fail("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) + " of " + path +
             " is outside the model's vocabulary [0, " + std::to_string(model.info().vocab_size) + ")");
    if (!o.save_tokens.empty()) {  // exactly the ids this run evaluates
      std::ostringstream f;
      rt::write_token_file(f, ids, tokenizer ? tokenizer->vocab_size() : model.info().vocab_size,
                           tokenizer ? tokenizer->kind() : "from-token-file");
      kvtools::write_atomically("--save-tokens", o.save_tokens + "/" + std::filesystem::path(path).stem().string() + ".ids",
                                f.str());
    }
    samples.push_back({path, std::move(ids)});
  }
  return samples;
}

}  // namespace kvbench
