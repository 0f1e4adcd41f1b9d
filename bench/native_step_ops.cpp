// Where the native decode step's time goes: its operations one at a time at a model's shape
// (Pythia-2.8B by default), each launched --reps times inside one CUDA graph and the graph
// replayed, so that a figure includes the gaps between launches as the step's own graph has
// them. Prints microseconds per launch, the bytes each moves per second, and each operation's
// share of the step (layers x one layer's operations, then the final LayerNorm and logits),
// beside one layer's operations replayed together and the card's copy bandwidth.
// Built with the native kernels only (a LibTorch with CUDA and the CUDA compiler).
//
//   native_step_ops [--rows 1] [--capacity 576] [--layers 32] [--hidden 2560] [--heads 32]
//                   [--ffn 10240] [--vocab 50304] [--rotary 20] [--dtype float16] [--reps 100]
#include <kvcompress/runtime/device.hpp>

#include "../include/kvcompress/runtime/src/native_step_kernels.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace rt = kvcompress::runtime;
namespace kn = kvcompress::runtime::kernels;

namespace {

struct Shape {
  int64_t rows = 1, capacity = 576, layers = 32, hidden = 2560, heads = 32, ffn = 10240, vocab = 50304, rotary = 20;
  int64_t reps = 100;
  at::ScalarType dtype = at::kHalf;
};

[[noreturn]] void usage_error(const std::string& what) {
  std::fprintf(stderr, "native_step_ops: error: %s\n", what.c_str());
  std::exit(2);
}

int64_t positive(const std::string& flag, const char* text, int64_t most) {
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || v < 1 || v > most)
    usage_error(flag + " must be an integer in [1, " + std::to_string(most) + "], got '" + text + "'");
  return v;
}

Shape parse(int argc, char** argv) {
  Shape s;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("native_step_ops [--rows N] [--capacity C] [--layers L] [--hidden H] [--heads N] [--ffn F]\n"
                  "                [--vocab V] [--rotary R] [--dtype float16|bfloat16|float32] [--reps N]\n");
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const char* v = argv[++i];
    if (flag == "--rows") s.rows = positive(flag, v, 1 << 16);
    else if (flag == "--capacity") s.capacity = positive(flag, v, 1 << 22);
    else if (flag == "--layers") s.layers = positive(flag, v, 1024);
    else if (flag == "--hidden") s.hidden = positive(flag, v, 1 << 16);
    else if (flag == "--heads") s.heads = positive(flag, v, 1024);
    else if (flag == "--ffn") s.ffn = positive(flag, v, 1 << 18);
    else if (flag == "--vocab") s.vocab = positive(flag, v, 1 << 20);
    else if (flag == "--rotary") s.rotary = positive(flag, v, 1024);
    else if (flag == "--reps") s.reps = positive(flag, v, 10000);
    else if (flag == "--dtype") {
      const std::string d = v;
      if (d == "float16") s.dtype = at::kHalf;
      else if (d == "bfloat16") s.dtype = at::kBFloat16;
      else if (d == "float32") s.dtype = at::kFloat;
      else usage_error("--dtype must be float16, bfloat16 or float32, got '" + d + "'");
    } else {
      usage_error("unknown option '" + flag + "' (--help lists them)");
    }
  }
  if (s.hidden % s.heads != 0) usage_error("--hidden must be a multiple of --heads");
  const int64_t dim = s.hidden / s.heads;
  if (dim > 256) usage_error("head_dim (hidden / heads) must be at most 256, got " + std::to_string(dim));
  if (s.rotary > dim || s.rotary % 2 != 0) usage_error("--rotary must be even and at most head_dim");
  return s;
}

kn::DType kernel_dtype(at::ScalarType t) {
  return t == at::kFloat ? kn::DType::f32 : t == at::kHalf ? kn::DType::f16 : kn::DType::bf16;
}

void check_launch(const char* what) {
  const std::string error = kn::last_error();
  if (!error.empty()) throw std::runtime_error(std::string(what) + ": CUDA error: " + error);
}

// Microseconds per call of fn: `reps` calls recorded in one graph, the graph replayed 20 times
// (after one replay to warm up) between two events.
double time_us(const std::function<void()>& fn, int64_t reps) {
  rt::CudaGraph graph;
  graph.capture([&] {
    for (int64_t i = 0; i < reps; ++i) fn();
    return at::Tensor();
  }, 1);
  graph.replay();
  constexpr int kReplays = 20;
  rt::CudaEvents events;
  events.record();
  for (int i = 0; i < kReplays; ++i) graph.replay();
  events.record();
  return events.seconds(0, 1) * 1e6 / static_cast<double>(reps * kReplays);
}

}  // namespace

int main(int argc, char** argv) {
  const Shape s = parse(argc, argv);
  if (!at::hasCUDA()) usage_error("no CUDA device");
  try {
    at::manual_seed(0);
    const auto opts = at::TensorOptions().dtype(s.dtype).device(at::kCUDA);
    const int64_t h = s.hidden, dim = h / s.heads, esz = static_cast<int64_t>(at::elementSize(s.dtype));
    const int64_t splits = (s.capacity + 63) / 64;
    // One layer's tensors (every layer reads as much; the weights of one stand for all).
    const at::Tensor w_in = at::randn({3 * h + s.ffn, h}, opts) * 0.02, b_in = at::randn({3 * h + s.ffn}, opts) * 0.02;
    const at::Tensor w_out = at::randn({h, h + s.ffn}, opts) * 0.02, b_out = at::randn({h}, opts) * 0.02;
    const at::Tensor embed_out = at::randn({s.vocab, h}, opts) * 0.02;
    const at::Tensor gamma = at::ones({h}, opts), beta = at::zeros({h}, opts);
    at::Tensor x = at::randn({s.rows, h}, opts), normed = at::empty({s.rows, h}, opts);
    at::Tensor projected = at::randn({s.rows, 3 * h + s.ffn}, opts), joined = at::empty({s.rows, h + s.ffn}, opts);
    at::Tensor logits = at::empty({s.rows, s.vocab}, opts);
    at::Tensor keys = at::randn({s.rows, s.heads, s.capacity, dim}, opts);
    at::Tensor values = at::randn({s.rows, s.heads, s.capacity, dim}, opts);
    const at::Tensor lengths = at::full({1}, s.capacity - 1, opts.dtype(at::kLong));  // the new token in the last slot
    const at::Tensor positions = at::full({s.rows, 1}, s.capacity - 1, opts.dtype(at::kLong));
    at::Tensor partial = at::empty({s.rows * s.heads * splits * (dim + 2)}, opts.dtype(at::kFloat));

    kn::AttentionArgs a;
    a.dtype = kernel_dtype(s.dtype);
    a.rows = s.rows;
    a.heads = s.heads;
    a.head_dim = dim;
    a.capacity = s.capacity;
    a.qkv = projected.data_ptr();
    a.qkv_stride = projected.size(1);
    a.qkv_bias = b_in.data_ptr();
    a.keys = keys.data_ptr();
    a.values = values.data_ptr();
    a.vectorized = (dim * esz) % 16 == 0;
    a.lengths = lengths.data_ptr<int64_t>();
    a.lengths_stride = 0;
    a.positions = positions.data_ptr<int64_t>();
    a.positions_stride = 1;
    a.rotary_ndims = s.rotary;
    a.scale = 1.f / std::sqrt(static_cast<float>(dim));
    a.chunk = 64;
    a.splits = splits;
    a.partial = partial.data_ptr<float>();
    a.out = joined.data_ptr();
    a.out_stride = joined.size(1);
    a.carry = static_cast<const char*>(projected.data_ptr()) + 3 * h * esz;
    a.carry_bias = static_cast<const char*>(b_in.data_ptr()) + 3 * h * esz;
    a.carry_cols = s.ffn;
    a.carry_out = static_cast<char*>(joined.data_ptr()) + h * esz;

    auto stream = [] { return c10::cuda::getCurrentCUDAStream().stream(); };
    const auto layer_norm = [&] {
      kn::add_and_layer_norm(a.dtype, x.data_ptr(), b_out.data_ptr(), normed.data_ptr(), nullptr, nullptr, s.rows, h,
                             1e-5f, stream());
      check_launch("LayerNorm");
    };
    const auto product_in = [&] { at::mm_out(projected, normed, w_in.t()); };
    const auto attention = [&] {
      kn::decode_attention(a, stream());
      check_launch("decode attention");
    };
    const auto product_out = [&] { x.addmm_(joined, w_out.t()); };
    const auto final_norm = [&] {
      kn::add_and_layer_norm(a.dtype, x.data_ptr(), b_out.data_ptr(), normed.data_ptr(), gamma.data_ptr(),
                             beta.data_ptr(), s.rows, h, 1e-5f, stream());
      check_launch("final LayerNorm");
    };
    const auto product_logits = [&] { at::mm_out(logits, normed, embed_out.t()); };
    const auto layer = [&] {
      layer_norm();
      product_in();
      attention();
      product_out();
    };
    // The residual grows by a random product every launch: keep it finite between timings.
    const auto settle = [&] { x.normal_(); };

    const at::Tensor src = at::empty({int64_t{1} << 29}, opts.dtype(at::kByte)), dst = at::empty_like(src);
    const double copy_us = time_us([&] { dst.copy_(src); }, 5);
    const double bandwidth = 2.0 * static_cast<double>(src.numel()) / (copy_us * 1e-6);  // read + write

    struct Op {
      const char* name;
      std::function<void()> fn;
      double bytes;   // moved per launch (weights, caches, activations)
      int64_t count;  // launches per step
      double us = 0;
    };
    const double act = static_cast<double>(s.rows * esz);
    std::vector<Op> ops{
        {"LayerNorm (+ pending bias)", layer_norm, 3.0 * act * h, s.layers},
        {"product in (QKV + MLP in)", product_in, static_cast<double>((3 * h + s.ffn) * h * esz), s.layers},
        {"attention + combine + GELU", attention,
         2.0 * static_cast<double>(s.rows * s.heads * s.capacity * dim * esz) + 2.0 * act * s.ffn, s.layers},
        {"product out (+ residual)", product_out, static_cast<double>(h * (h + s.ffn) * esz), s.layers},
        {"final LayerNorm", final_norm, 3.0 * act * h, 1},
        {"logits", product_logits, static_cast<double>(s.vocab * h * esz), 1},
    };
    double step_us = 0;
    for (auto& op : ops) {
      settle();
      op.us = time_us(op.fn, s.reps);
      step_us += op.us * static_cast<double>(op.count);
    }
    // What a step must read at least: every layer's two products' weights and the logits' matrix.
    const double weight_bytes = static_cast<double>(s.layers) * (ops[1].bytes + ops[3].bytes) + ops[5].bytes;
    const double limit_us = weight_bytes / bandwidth * 1e6;
    settle();
    const double layer_us = time_us(layer, s.reps);

    std::printf("native step operations: rows %lld, capacity %lld, %lld layers, hidden %lld, %lld heads x %lld, "
                "ffn %lld, vocab %lld, %s, %lld launches per graph\n",
                (long long)s.rows, (long long)s.capacity, (long long)s.layers, (long long)h, (long long)s.heads,
                (long long)dim, (long long)s.ffn, (long long)s.vocab, c10::toString(s.dtype), (long long)s.reps);
    std::printf("copy bandwidth %.2f TB/s (read + write, 512 MiB)\n\n", bandwidth / 1e12);
    std::printf("%-28s %10s %10s %12s %8s\n", "operation", "us/launch", "TB/s", "us per step", "share");
    for (const auto& op : ops)
      std::printf("%-28s %10.2f %10.2f %12.1f %7.1f%%\n", op.name, op.us, op.bytes / (op.us * 1e-6) / 1e12,
                  op.us * static_cast<double>(op.count), 100.0 * op.us * static_cast<double>(op.count) / step_us);
    std::printf("%-28s %10s %10s %12.1f\n", "sum (the step's estimate)", "", "", step_us);
    std::printf("weight-streaming limit %.1f us (%.3f GB of weights at the copy bandwidth): the estimate is %.2fx it\n",
                limit_us, weight_bytes / 1e9, step_us / limit_us);
    std::printf("\none layer's four operations replayed together: %.2f us (their sum: %.2f us)\n", layer_us,
                ops[0].us + ops[1].us + ops[2].us + ops[3].us);

    // kvcompress's own matrix-vector product (kernels::gemv) beside cuBLAS for the three
    // products, with the largest difference of its result from cuBLAS's.
    if (s.rows > kn::kMaxGemvRows) return 0;
    struct Product {
      const char* name;
      const at::Tensor& in;
      const at::Tensor& weight;
      at::Tensor& out;
      bool accumulate;
      double cublas_us;
    };
    const Product products[] = {{"product in", normed, w_in, projected, false, ops[1].us},
                                {"product out", joined, w_out, x, true, ops[3].us},
                                {"logits", normed, embed_out, logits, false, ops[5].us}};
    std::printf("\n%-12s %14s %14s %10s %22s\n", "product", "cuBLAS us", "gemv us", "gemv TB/s",
                "max |diff| / max |y|");
    for (const auto& p : products) {
      settle();
      at::Tensor theirs = p.accumulate ? p.out.clone() : at::empty_like(p.out);
      at::Tensor mine = p.accumulate ? p.out.clone() : at::empty_like(p.out);
      if (p.accumulate) theirs.addmm_(p.in, p.weight.t());
      else at::mm_out(theirs, p.in, p.weight.t());
      const auto run = [&](at::Tensor& y) {
        if (!kn::gemv(a.dtype, p.in.data_ptr(), p.in.size(1), p.weight.data_ptr(), s.rows, p.weight.size(0),
                      p.weight.size(1), y.data_ptr(), y.size(1), p.accumulate, stream()))
          throw std::runtime_error(std::string(p.name) + ": gemv refused its shape");
        check_launch(p.name);
      };
      run(mine);
      const double diff = (mine.to(at::kFloat) - theirs.to(at::kFloat)).abs().max().item<double>();
      const double scale = theirs.to(at::kFloat).abs().max().item<double>();
      at::Tensor timed = mine.clone();
      const double us = time_us([&] { run(timed); }, s.reps);
      std::printf("%-12s %14.2f %14.2f %10.2f %22.2e\n", p.name, p.cublas_us, us,
                  static_cast<double>(p.weight.numel() * esz) / (us * 1e-6) / 1e12, diff / scale);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "native_step_ops: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
