#pragma once
// Token-id files, format kvcompress-tokens v1 (what kvtok and examples/python/tokenize_text.py
// write, and kvbench --tokens reads): UTF-8 text,
//   line 1: # kvcompress-tokens v1 vocab_size=N tokenizer=NAME
//   then:   decimal token ids separated by any whitespace.
#include <kvcompress/params.hpp>
#include <kvcompress/types.hpp>

#include <cstdint>
#include <fstream>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

/// The ids of a token file; an Error names the file and what is wrong with it.
inline std::vector<int64_t> read_token_file(const std::string& path) {
  const std::string name = params::printable(path);
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error("token file not found or unreadable: " + name);
  std::string header;
  std::getline(file, header);
  if (header.rfind("# kvcompress-tokens v1", 0) != 0)
    throw Error("token file " + name + " does not start with '# kvcompress-tokens v1' (make it with kvtok "
                "or examples/python/tokenize_text.py)");
  std::vector<int64_t> ids;
  std::string word;
  while (file >> word) {
    int64_t id = 0;
    if (!params::parse_int(word, id))
      throw Error("token file " + name + ": '" + params::printable(word) + "' is not a token id (entry " +
                  std::to_string(ids.size()) + ")");
    ids.push_back(id);
  }
  if (file.bad()) throw Error("token file " + name + ": read error");
  return ids;
}

/// Writes `ids` in the format, 20 per line. `tokenizer` is a name without spaces.
inline void write_token_file(std::ostream& out, const std::vector<int64_t>& ids, int64_t vocab_size,
                             const std::string& tokenizer) {
  out << "# kvcompress-tokens v1 vocab_size=" << vocab_size << " tokenizer=" << tokenizer << "\n";
  for (size_t i = 0; i < ids.size(); ++i) out << ids[i] << ((i % 20 == 19 || i + 1 == ids.size()) ? "\n" : " ");
}

}  // namespace runtime
}  // namespace kvcompress
