#pragma once
// Hand-built caches whose key norms the test chooses, so expected kept positions are known by
// construction, and the checks every policy test shares.
#include <kvcompress/kvcompress.hpp>

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvtest {

using Norms = std::vector<std::vector<std::vector<double>>>;  // [batch][heads][seq]
using Positions = std::vector<std::vector<std::vector<int64_t>>>;  // [batch][heads][kept]

inline at::Device device_named(const std::string& name) {
  return name == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
}

/// Keys whose vector at (b, h, t) is norms[b][h][t] * e_0 (its L2 norm is exactly that value);
/// values are random, so a wrong gather cannot go unnoticed.
inline kvcompress::LayerKV layer_from_norms(const Norms& norms, int64_t head_dim = 4,
                                            at::ScalarType dtype = at::kFloat,
                                            at::Device device = at::kCPU) {
  const int64_t b = static_cast<int64_t>(norms.size());
  const int64_t h = static_cast<int64_t>(norms[0].size());
  const int64_t s = static_cast<int64_t>(norms[0][0].size());
  at::Tensor keys = at::zeros({b, h, s, head_dim}, at::kDouble);
  auto acc = keys.accessor<double, 4>();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < h; ++j)
      for (int64_t t = 0; t < s; ++t) acc[i][j][t][0] = norms[i][j][t];
  at::Tensor values = at::randn({b, h, s, head_dim}, at::kDouble);
  return {keys.to(dtype).to(device), values.to(dtype).to(device)};
}

/// Norms 1..seq rising (`rising`) or falling with position.
inline std::vector<double> ramp(int64_t seq, bool rising) {
  std::vector<double> v(static_cast<size_t>(seq));
  for (int64_t t = 0; t < seq; ++t) v[static_cast<size_t>(t)] = rising ? t + 1.0 : double(seq - t);
  return v;
}

inline std::vector<int64_t> span(int64_t start, int64_t length) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < length; ++i) v.push_back(start + i);
  return v;
}

inline std::vector<int64_t> join(std::initializer_list<std::vector<int64_t>> parts) {
  std::vector<int64_t> v;
  for (const auto& p : parts) v.insert(v.end(), p.begin(), p.end());
  return v;
}

/// Asserts that `out` holds exactly the tokens of `in` at `expected[b][h]`, in that order,
/// bitwise equal for keys and values.
inline void expect_kept(const kvcompress::LayerKV& out, const kvcompress::LayerKV& in,
                        const Positions& expected) {
  const int64_t b = in.first.size(0), h = in.first.size(1), d = in.first.size(3);
  const int64_t k = static_cast<int64_t>(expected[0][0].size());
  ASSERT_EQ(out.first.sizes(), at::IntArrayRef({b, h, k, d}));
  ASSERT_EQ(out.second.sizes(), at::IntArrayRef({b, h, k, d}));
  EXPECT_EQ(out.first.device(), in.first.device());
  EXPECT_EQ(out.first.scalar_type(), in.first.scalar_type());
  at::Tensor idx = at::empty({b, h, k}, at::kLong);
  auto acc = idx.accessor<int64_t, 3>();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < h; ++j) {
      ASSERT_EQ(static_cast<int64_t>(expected[i][j].size()), k);
      for (int64_t t = 0; t < k; ++t) acc[i][j][t] = expected[i][j][t];
    }
  at::Tensor gather = idx.to(in.first.device()).unsqueeze(-1).expand({b, h, k, d});
  EXPECT_TRUE(at::equal(out.first, in.first.gather(2, gather))) << "kept keys differ";
  EXPECT_TRUE(at::equal(out.second, in.second.gather(2, gather))) << "kept values differ";
}

/// The same positions for every (row, head).
inline Positions everywhere(int64_t batch, int64_t heads, const std::vector<int64_t>& pos) {
  return Positions(batch, std::vector<std::vector<int64_t>>(heads, pos));
}

inline void expect_unchanged(const kvcompress::LayerKV& out, const kvcompress::LayerKV& in) {
  EXPECT_TRUE(out.first.is_same(in.first));
  EXPECT_TRUE(out.second.is_same(in.second));
}

/// Runs `fn` and checks it throws kvcompress::Error whose message contains every fragment.
template <class Fn>
void expect_error(Fn&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected kvcompress::Error";
  } catch (const kvcompress::Error& e) {
    const std::string msg = e.what();
    for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "message: " << msg;
  }
}

}  // namespace kvtest
