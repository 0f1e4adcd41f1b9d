// Way in #2: a method chosen by a string, e.g. from a command line.
#include <kvcompress/kvcompress.hpp>

#include <iostream>

int main(int argc, char** argv) {
  const std::string spec = argc > 1 ? argv[1] : "snapkv_lite(observation_window=32, keep_size=256)";
  std::cout << "methods:";
  for (const auto& name : kvcompress::list_methods()) std::cout << ' ' << name;
  std::cout << '\n';
  try {
    std::unique_ptr<kvcompress::Compressor> c = kvcompress::make_compressor(spec);
    kvcompress::KVCache kv(3, {at::randn({2, 4, 700, 32}), at::randn({2, 4, 700, 32})});
    kvcompress::KVCache out = c->compress(kv);
    std::cout << c->spec() << ": " << kv[2].first.size(2) << " -> " << out[2].first.size(2)
              << " tokens\n";
  } catch (const kvcompress::Error& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 2;
  }
}
