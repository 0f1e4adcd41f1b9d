// kvtok: text <-> token ids with any tokenizer kvcompress::runtime reads (tokenizer.hpp): a
// Hugging Face tokenizer.json (GPT-NeoX / Pythia byte-level BPE), a SentencePiece .model, or a
// contract model .pt that embeds either.
//   kvtok --tokenizer FILE --encode TEXT_FILE [--out IDS_FILE]   ids, kvcompress-tokens v1
//   kvtok --tokenizer FILE --decode IDS_FILE [--out TEXT_FILE]   the text they spell
// Without --out the result goes to standard output.
#include "../common/tool_cli.hpp"

#include <kvcompress/params.hpp>
#include <kvcompress/runtime/model.hpp>
#include <kvcompress/runtime/token_file.hpp>
#include <kvcompress/runtime/tokenizer.hpp>
#include <kvcompress/version.hpp>

#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

namespace {

using kvtools::fail;

std::string stem(const std::string& path) {
  std::string base = path.substr(path.find_last_of('/') + 1);
  for (const char* ext : {".json", ".model", ".pt"})
    if (base.size() > std::strlen(ext) && base.compare(base.size() - std::strlen(ext), std::string::npos, ext) == 0)
      base.resize(base.size() - std::strlen(ext));
  std::string out;
  for (char c : base) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.') ? c : '-';
  return out.empty() ? "unknown" : out;
}

int run(int argc, char** argv) {
  std::string tokenizer, encode, decode, out, name;
  kvtools::Cli cli("kvtok",
                   "Text <-> token ids with any tokenizer kvcompress::runtime reads.\n"
                   "Usage: kvtok --tokenizer FILE (--encode TEXT_FILE | --decode IDS_FILE) [--out FILE]",
                   std::string("kvtok (kvcompress ") + kvcompress::version_string + ")");
  const char* g = "Options";
  cli.text("--tokenizer", tokenizer, "FILE", g,
           "a tokenizer.json (Hugging Face, byte-level BPE: GPT-2, GPT-NeoX, Pythia),\n"
           "a SentencePiece .model, or a contract model .pt that embeds one");
  cli.text("--encode", encode, "FILE", g,
           "UTF-8 text -> token ids (kvcompress-tokens v1, the format kvbench --tokens\n"
           "reads); no special tokens are added");
  cli.text("--decode", decode, "FILE", g, "token ids (kvcompress-tokens v1) -> the bytes they spell");
  cli.text("--out", out, "FILE", g, "write there instead of standard output");
  cli.text("--name", name, "NAME", g, "the tokenizer name written in the ids header (default: the file's stem)");
  cli.parse(argc, argv);
  if (tokenizer.empty()) fail("--tokenizer FILE is required (see --help)");
  if (encode.empty() == decode.empty()) fail("give exactly one of --encode TEXT_FILE and --decode IDS_FILE");
  const auto tok = kvcompress::runtime::load_tokenizer(tokenizer);
  std::ostringstream result;
  if (!encode.empty()) {
    const std::string text = kvtools::read_file(encode, "text");
    std::vector<int64_t> ids;
    try {
      ids = tok->encode(text);
    } catch (const kvcompress::Error& e) {
      fail(std::string(e.what()) + " (in " + kvcompress::params::printable(encode) + ")");
    }
    kvcompress::runtime::write_token_file(result, ids, tok->vocab_size(), name.empty() ? stem(tokenizer) : name);
  } else {
    result << tok->decode_bytes(kvcompress::runtime::read_token_file(decode));
  }
  const std::string bytes = result.str();
  if (out.empty()) {
    if (std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size() || std::fflush(stdout) != 0)
      fail("cannot write to standard output");
    return 0;
  }
  kvtools::write_atomically("--out", out, bytes);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    // One line: an error from LibTorch's .pt reader carries its backtrace after the first.
    std::fprintf(stderr, "kvtok: error: %s\n", kvcompress::params::printable(kvcompress::runtime::first_line(e)).c_str());
    return 2;
  }
}
