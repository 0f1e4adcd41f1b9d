// kvtok: text <-> token ids with any tokenizer kvcompress::runtime reads (tokenizer.hpp): a
// Hugging Face tokenizer.json (GPT-NeoX / Pythia byte-level BPE), a SentencePiece .model, or a
// contract model .pt that embeds either.
//   kvtok --tokenizer FILE --encode TEXT_FILE [--out IDS_FILE]   ids, kvcompress-tokens v1
//   kvtok --tokenizer FILE --decode IDS_FILE [--out TEXT_FILE]   the text they spell
// Without --out the result goes to standard output.
#include <kvcompress/params.hpp>
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

const char* kUsage = R"(usage: kvtok --tokenizer FILE (--encode TEXT_FILE | --decode IDS_FILE) [--out FILE]

  --tokenizer FILE   a tokenizer.json (Hugging Face, byte-level BPE: GPT-2, GPT-NeoX, Pythia),
                     a SentencePiece .model, or a contract model .pt that embeds one
  --encode FILE      UTF-8 text -> token ids (kvcompress-tokens v1, the format kvbench --tokens
                     reads); no special tokens are added
  --decode FILE      token ids (kvcompress-tokens v1) -> the bytes they spell
  --out FILE         write there instead of standard output
  --name NAME        the tokenizer name written in the ids header (default: the file's stem)
  --version, --help
)";

[[noreturn]] void fail(const std::string& msg) { throw kvcompress::Error(msg); }

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("text file not found or unreadable: " + kvcompress::params::printable(path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

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
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") { std::fputs(kUsage, stdout); return 0; }
    if (a == "--version") { std::printf("kvtok (kvcompress %s)\n", kvcompress::version_string); return 0; }
    std::string* dest = a == "--tokenizer" ? &tokenizer : a == "--encode" ? &encode : a == "--decode" ? &decode
                        : a == "--out" ? &out : a == "--name" ? &name : nullptr;
    if (!dest) fail("unknown option '" + kvcompress::params::printable(a) + "' (see --help)");
    if (i + 1 >= argc) fail(a + " expects a value");
    *dest = argv[++i];
  }
  if (tokenizer.empty()) fail("--tokenizer FILE is required (see --help)");
  if (encode.empty() == decode.empty()) fail("give exactly one of --encode TEXT_FILE and --decode IDS_FILE");
  const auto tok = kvcompress::runtime::load_tokenizer(tokenizer);
  std::ostringstream result;
  if (!encode.empty()) {
    const std::string text = slurp(encode);
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
  std::ofstream f(out, std::ios::binary);
  if (!f) fail("cannot open " + kvcompress::params::printable(out) + " for writing");
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) fail("cannot write " + kvcompress::params::printable(out));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtok: error: %s\n", kvcompress::params::printable(e.what()).c_str());
    return 2;
  }
}
