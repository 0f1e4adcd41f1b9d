// Parity with the Python course project: every case of the file named by KVC_PARITY_CASES (made
// by tests/reference/make_parity_cases.py from tests/reference/seed_policies.py, which is written
// from the rules document alone) is run through make_compressor(spec)->compress(kv), and every
// layer must equal the reference's output exactly: same shape, bitwise-equal keys and values.
//
// File format (little-endian), see make_parity_cases.py:
//   "KVCPAR01", u32 cases; per case: u32 len + spec, u32 layers; per layer: 4 x i64 shape,
//   f32 keys, f32 values, u8 unchanged; if unchanged == 0: i64 kept, f32 keys, f32 values
//   of shape [batch, heads, kept, head_dim].
#include <kvcompress/kvcompress.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct ParityLayer {
  at::Tensor keys, values;
  bool unchanged = true;
  at::Tensor expected_keys, expected_values;
};

struct ParityCase {
  std::string spec;
  std::vector<ParityLayer> layers;
};

class Reader {
 public:
  explicit Reader(const std::string& path) : in_(path, std::ios::binary) {}
  bool ok() const { return static_cast<bool>(in_); }

  void bytes(void* dst, size_t n) {
    in_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    if (!in_) throw std::runtime_error("parity case file is truncated");
  }
  template <typename T>
  T scalar() {  // the file is little-endian, like every host this library targets
    T v;
    bytes(&v, sizeof(T));
    return v;
  }
  at::Tensor floats(std::vector<int64_t> shape) {
    at::Tensor t = at::empty(shape, at::kFloat);
    bytes(t.data_ptr<float>(), static_cast<size_t>(t.numel()) * sizeof(float));
    return t;
  }
  bool at_end() { return in_.peek() == std::char_traits<char>::eof(); }

 private:
  std::ifstream in_;
};

std::vector<ParityCase> read_cases(const std::string& path) {
  Reader r(path);
  if (!r.ok()) throw std::runtime_error("cannot open parity case file " + path);
  char magic[8];
  r.bytes(magic, 8);
  if (std::memcmp(magic, "KVCPAR01", 8) != 0) throw std::runtime_error("bad magic in " + path);
  const uint32_t n = r.scalar<uint32_t>();
  std::vector<ParityCase> cases(n);
  for (auto& c : cases) {
    c.spec.resize(r.scalar<uint32_t>());
    r.bytes(&c.spec[0], c.spec.size());
    c.layers.resize(r.scalar<uint32_t>());
    for (auto& l : c.layers) {
      std::vector<int64_t> shape(4);
      for (auto& s : shape) s = r.scalar<int64_t>();
      l.keys = r.floats(shape);
      l.values = r.floats(shape);
      l.unchanged = r.scalar<uint8_t>() != 0;
      if (!l.unchanged) {
        shape[2] = r.scalar<int64_t>();
        l.expected_keys = r.floats(shape);
        l.expected_values = r.floats(shape);
      }
    }
  }
  if (!r.at_end()) throw std::runtime_error("trailing bytes in " + path);
  return cases;
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// Kept positions of one (row, head): values[..., t, 0] holds the source position t.
std::string positions(const at::Tensor& values, int64_t b, int64_t h) {
  at::Tensor p = values.select(0, b).select(0, h).select(-1, 0).to(at::kLong).contiguous();
  std::ostringstream os;
  os << "[";
  const int64_t* d = p.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.numel(); ++i) os << (i ? " " : "") << d[i];
  os << "]";
  return os.str();
}

// Empty when equal; otherwise where and how the output differs from the expected layer.
std::string compare_layer(const kvcompress::LayerKV& out, const at::Tensor& ek, const at::Tensor& ev) {
  std::ostringstream os;
  if (!out.first.defined() || !out.second.defined()) return "output tensors are undefined";
  if (out.first.scalar_type() != at::kFloat || out.second.scalar_type() != at::kFloat)
    return "output dtype is not float32";
  if (!out.first.sizes().equals(ek.sizes()) || !out.second.sizes().equals(ev.sizes())) {
    os << "shape: got keys " << shape_str(out.first) << " values " << shape_str(out.second)
       << ", expected " << shape_str(ek);
    if (out.second.dim() == 4 && out.second.size(3) > 0 && out.second.size(0) == ev.size(0) &&
        out.second.size(1) == ev.size(1))
      os << "\n    (row 0, head 0) kept positions: got " << positions(out.second, 0, 0) << "\n"
         << "                            expected " << positions(ev, 0, 0);
    return os.str();
  }
  if (at::equal(out.first, ek) && at::equal(out.second, ev)) return "";
  const int64_t B = ek.size(0), H = ek.size(1), K = ek.size(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < K; ++t) {
        at::Tensor gk = out.first[b][h][t], xk = ek[b][h][t];
        at::Tensor gv = out.second[b][h][t], xv = ev[b][h][t];
        if (at::equal(gk, xk) && at::equal(gv, xv)) continue;
        os << "first difference at (row " << b << ", head " << h << ", kept index " << t
           << "): got source position " << gv[0].item<float>() << ", expected "
           << xv[0].item<float>() << (at::equal(gk, xk) ? " (keys equal, values differ)" : "")
           << "\n    kept positions: got      " << positions(out.second, b, h)
           << "\n                    expected " << positions(ev, b, h);
        return os.str();
      }
  return "tensors differ but no differing position was found";
}

}  // namespace

TEST(Parity, MatchesPythonReference) {
  const char* path = std::getenv("KVC_PARITY_CASES");
  if (path == nullptr || *path == '\0')
    GTEST_SKIP() << "KVC_PARITY_CASES is not set: run the ctest test parity_cases_check, or set it "
                    "to a file made by tests/reference/make_parity_cases.py";
  std::vector<ParityCase> cases;
  try {
    cases = read_cases(path);
  } catch (const std::exception& e) {
    FAIL() << e.what();
  }
  ASSERT_FALSE(cases.empty()) << "no cases in " << path;

  int64_t layers_compared = 0, compressed_layers = 0, failed_cases = 0, failed_layers = 0;
  for (const auto& c : cases) {
    kvcompress::KVCache in;
    for (const auto& l : c.layers) in.emplace_back(l.keys, l.values);
    kvcompress::KVCache out;
    try {
      out = kvcompress::make_compressor(c.spec)->compress(in);
    } catch (const std::exception& e) {
      ADD_FAILURE() << c.spec << ": threw: " << e.what();
      ++failed_cases;
      continue;
    }
    if (out.size() != c.layers.size()) {
      ADD_FAILURE() << c.spec << ": " << out.size() << " layers out, " << c.layers.size() << " in";
      ++failed_cases;
      continue;
    }
    bool case_ok = true;
    for (size_t i = 0; i < c.layers.size(); ++i) {
      const auto& l = c.layers[i];
      const at::Tensor& ek = l.unchanged ? l.keys : l.expected_keys;
      const at::Tensor& ev = l.unchanged ? l.values : l.expected_values;
      std::string diff = compare_layer(out[i], ek, ev);
      ++layers_compared;
      if (!l.unchanged) ++compressed_layers;
      if (!diff.empty()) {
        ADD_FAILURE() << c.spec << "\n  layer " << i << " of " << c.layers.size() << ", input "
                      << shape_str(l.keys) << (l.unchanged ? ", reference: unchanged" : "")
                      << "\n  " << diff;
        ++failed_layers;
        case_ok = false;
      }
    }
    if (!case_ok) ++failed_cases;
  }
  std::printf("[ parity   ] %zu cases, %lld layers compared (%lld compressed by the reference); "
              "%lld cases / %lld layers differ\n",
              cases.size(), static_cast<long long>(layers_compared),
              static_cast<long long>(compressed_layers), static_cast<long long>(failed_cases),
              static_cast<long long>(failed_layers));
  RecordProperty("cases", static_cast<int>(cases.size()));
  RecordProperty("layers", static_cast<int>(layers_compared));
}
