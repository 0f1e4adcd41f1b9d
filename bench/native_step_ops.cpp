// Where the native decode step's time goes: its operations one at a time at a model's shape
// (Pythia-2.8B by default), each launched --reps times inside one CUDA graph and the graph
// replayed, so that a figure includes the gaps between launches as the step's own graph has
// them. Prints microseconds per launch, the bytes each moves per second, and each operation's
// share of the step (layers x one layer's operations, then the final LayerNorm and logits),
// beside one layer's operations replayed together, the whole step (NativeStep::step) replayed
// from a graph against its layers' sum, and the card's copy bandwidth.
// Built with the native kernels only (a LibTorch with CUDA and the CUDA compiler).
//
//   native_step_ops [--rows 1] [--capacity 576] [--length C-1] [--layers 32] [--hidden 2560] [--heads 32]
//                   [--ffn 10240] [--vocab 50304] [--rotary 20] [--dtype float16] [--reps 100]
//                   [--pdl 1]   (0: the kernels launched plainly, as KVC_NATIVE_PDL=0 does)
//                   [--chunk 64] (slots per attention block, as KVC_NATIVE_CHUNK sets it)
//                   [--prefetch 1] (0: the attention prefetches no keys and values into L2)
#include <kvcompress/runtime/device.hpp>
#include <kvcompress/runtime/native_step.hpp>

#include "../include/kvcompress/runtime/src/native_step_kernels_aten.hpp"

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
  int64_t length = -1;  // slots held before the new token: capacity - 1 unless set
  at::ScalarType dtype = at::kHalf;
  bool early_launch = true, prefetch = true;
  int64_t chunk = 64;
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
      std::printf("native_step_ops [--rows N] [--capacity C] [--length L] [--layers L] [--hidden H] [--heads N] [--ffn F]\n"
                  "                [--vocab V] [--rotary R] [--dtype float16|bfloat16|float32] [--reps N]\n"
                  "                [--pdl 0|1] [--chunk SLOTS] [--prefetch 0|1]\n");
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const char* v = argv[++i];
    if (flag == "--rows") s.rows = positive(flag, v, 1 << 16);
    else if (flag == "--capacity") s.capacity = positive(flag, v, 1 << 22);
    else if (flag == "--length") s.length = positive(flag, v, 1 << 22);
    else if (flag == "--layers") s.layers = positive(flag, v, 1024);
    else if (flag == "--hidden") s.hidden = positive(flag, v, 1 << 16);
    else if (flag == "--heads") s.heads = positive(flag, v, 1024);
    else if (flag == "--ffn") s.ffn = positive(flag, v, 1 << 18);
    else if (flag == "--vocab") s.vocab = positive(flag, v, 1 << 20);
    else if (flag == "--rotary") s.rotary = positive(flag, v, 1024);
    else if (flag == "--reps") s.reps = positive(flag, v, 10000);
    else if (flag == "--chunk") s.chunk = positive(flag, v, 512);
    else if (flag == "--pdl" || flag == "--prefetch") {
      const std::string e = v;
      if (e != "0" && e != "1") usage_error(flag + " must be 0 or 1, got '" + e + "'");
      (flag == "--pdl" ? s.early_launch : s.prefetch) = e == "1";
    }
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
  if (s.length < 0) s.length = s.capacity - 1;
  if (s.length >= s.capacity) usage_error("--length must leave the new token a slot: at most --capacity - 1");
  return s;
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
    const int64_t splits = (s.capacity + s.chunk - 1) / s.chunk;
    // Every layer's weights and caches of its own, launches cycling through them as the step's
    // layers do: one layer's tensors replayed would sit in the card's L2 cache.
    std::vector<at::Tensor> w_in, w_out, keys, values;
    for (int64_t l = 0; l < s.layers; ++l) {
      w_in.push_back(at::randn({3 * h + s.ffn, h}, opts) * 0.02);
      w_out.push_back(at::randn({h, h + s.ffn}, opts) * 0.02);
      keys.push_back(at::randn({s.rows, s.heads, s.capacity, dim}, opts));
      values.push_back(at::randn({s.rows, s.heads, s.capacity, dim}, opts));
    }
    const at::Tensor b_in = at::randn({3 * h + s.ffn}, opts) * 0.02, b_out = at::randn({h}, opts) * 0.02;
    const at::Tensor embed_out = at::randn({s.vocab, h}, opts) * 0.02;
    const at::Tensor gamma = at::ones({h}, opts), beta = at::zeros({h}, opts);
    at::Tensor x = at::randn({s.rows, h}, opts), normed = at::empty({s.rows, h}, opts);
    at::Tensor projected = at::randn({s.rows, 3 * h + s.ffn}, opts), joined = at::empty({s.rows, h + s.ffn}, opts);
    at::Tensor logits = at::empty({s.rows, s.vocab}, opts);
    const at::Tensor lengths = at::full({1}, s.length, opts.dtype(at::kLong));  // the new token's slot
    const at::Tensor positions = at::full({s.rows, 1}, s.length, opts.dtype(at::kLong));
    at::Tensor partial = at::empty({s.rows * s.heads * splits * (dim + 2)}, opts.dtype(at::kFloat));
    at::Tensor counters = at::zeros({s.rows * s.heads}, opts.dtype(at::kInt));
    int64_t layer_at = 0;  // the layer the next launch reads
    const auto next_layer = [&] {
      const int64_t l = layer_at;
      layer_at = (layer_at + 1) % s.layers;
      return static_cast<size_t>(l);
    };

    kn::AttentionArgs a;
    a.dtype = kn::kernel_dtype(s.dtype);
    a.rows = s.rows;
    a.heads = s.heads;
    a.head_dim = dim;
    a.capacity = s.capacity;
    a.qkv = projected.data_ptr();
    a.qkv_stride = projected.size(1);
    a.qkv_bias = b_in.data_ptr();
    a.vectorized = (dim * esz) % 16 == 0;
    a.lengths = lengths.data_ptr<int64_t>();
    a.lengths_stride = 0;
    a.positions = positions.data_ptr<int64_t>();
    a.positions_stride = 1;
    a.rotary_ndims = s.rotary;
    a.scale = 1.f / std::sqrt(static_cast<float>(dim));
    a.chunk = s.chunk;
    a.splits = splits;
    a.partial = partial.data_ptr<float>();
    a.counters = counters.data_ptr<int>();
    a.out = joined.data_ptr();
    a.out_stride = joined.size(1);
    a.carry = static_cast<const char*>(projected.data_ptr()) + 3 * h * esz;
    a.carry_bias = static_cast<const char*>(b_in.data_ptr()) + 3 * h * esz;
    a.carry_cols = s.ffn;
    a.carry_out = static_cast<char*>(joined.data_ptr()) + h * esz;
    a.early_launch = s.early_launch;
    a.prefetch = s.prefetch;

    auto stream = [] { return c10::cuda::getCurrentCUDAStream().stream(); };
    at::Tensor mlp_sums = at::empty({s.rows, h}, opts.dtype(at::kFloat));
    // The fused products (kernels::gemv), as the step sets them up.
    const auto checked = [&](kn::GemvArgs g, const char* what) {
      g.early_launch = s.early_launch;
      if (!kn::gemv(g, stream())) throw std::runtime_error(std::string(what) + ": gemv refused its shape");
      check_launch(what);
    };
    const auto in_args = [&](size_t l) {  // LayerNorm + product in, GELU of the MLP's columns
      kn::GemvArgs g = kn::gemv_args(projected, x, w_in[l]);
      g.layer_norm = true;
      g.gelu_from = 3 * h;
      g.gelu_bias = static_cast<const char*>(b_in.data_ptr()) + 3 * h * esz;
      g.gelu_out = static_cast<char*>(joined.data_ptr()) + h * esz;
      g.gelu_stride = joined.stride(0);
      return g;
    };
    const auto mlp_args = [&](size_t l) {  // the attention's side product: the MLP's share of product out
      kn::GemvArgs g = kn::gemv_args(mlp_sums, joined.narrow(1, h, s.ffn), w_out[l].narrow(1, h, s.ffn));
      g.early_launch = s.early_launch;
      g.sums = mlp_sums.data_ptr<float>();
      g.sums_stride = mlp_sums.stride(0);
      return g;
    };
    const auto out_args = [&](size_t l) {  // the attention's share + the MLP's sums + residual + bias
      kn::GemvArgs g = kn::gemv_args(x, joined.narrow(1, 0, h), w_out[l].narrow(1, 0, h));
      g.addend = mlp_sums.data_ptr<float>();
      g.addend_stride = mlp_sums.stride(0);
      g.accumulate = true;
      g.bias = b_out.data_ptr();
      return g;
    };
    const auto layer_norm = [&] {
      kn::add_and_layer_norm(a.dtype, x.data_ptr(), b_out.data_ptr(), normed.data_ptr(), nullptr, nullptr, s.rows, h,
                             1e-5f, stream());
      check_launch("LayerNorm");
    };
    const auto product_in = [&] { at::mm_out(projected, normed, w_in[next_layer()].t()); };
    const auto launch_attention = [&](size_t l, const kn::GemvArgs* side) {
      kn::AttentionArgs at_ = a;
      at_.keys = keys[l].data_ptr();
      at_.values = values[l].data_ptr();
      if (side) {
        at_.carry = nullptr;
        at_.has_side_product = true;
        at_.side_product = *side;
      }
      if (!kn::decode_attention(at_, stream())) throw std::runtime_error("decode attention refused its shape");
      check_launch("decode attention");
    };
    const auto attention = [&] { launch_attention(next_layer(), nullptr); };
    const auto product_out = [&] { x.addmm_(joined, w_out[next_layer()].t()); };
    const auto final_norm = [&] {
      kn::add_and_layer_norm(a.dtype, x.data_ptr(), b_out.data_ptr(), normed.data_ptr(), gamma.data_ptr(),
                             beta.data_ptr(), s.rows, h, 1e-5f, stream());
      check_launch("final LayerNorm");
    };
    const auto product_logits = [&] { at::mm_out(logits, normed, embed_out.t()); };
    const bool fits = kn::gemv_fits(a.dtype, s.rows, h, true) && kn::gemv_fits(a.dtype, s.rows, s.ffn, false);
    const auto fused_in = [&] { checked(in_args(next_layer()), "LayerNorm + product in + GELU"); };
    const auto attention_mlp = [&] {
      const size_t l = next_layer();
      const kn::GemvArgs side = mlp_args(l);
      launch_attention(l, &side);
    };
    const auto fused_out = [&] { checked(out_args(next_layer()), "attention's product + bias"); };
    const auto fused_second = [&] {  // the attention with the MLP's product, then the attention's
      const size_t l = next_layer();
      const kn::GemvArgs side = mlp_args(l);
      launch_attention(l, &side);
      checked(out_args(l), "attention's product + bias");
    };
    const auto fused_logits = [&] {
      kn::GemvArgs g = kn::gemv_args(logits, x, embed_out);
      g.layer_norm = true;
      g.gamma = gamma.data_ptr();
      g.beta = beta.data_ptr();
      checked(g, "final LayerNorm + logits");
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
      bool fused;     // in the fused step (KVC_NATIVE_GEMV=1) rather than the cuBLAS one
      bool unfused;
      double us = 0;
    };
    const double act = static_cast<double>(s.rows * esz);
    const double in_bytes = static_cast<double>((3 * h + s.ffn) * h * esz);
    const double out_bytes = static_cast<double>(h * (h + s.ffn) * esz);
    const double logit_bytes = static_cast<double>(s.vocab * h * esz);
    const double kv_bytes = 2.0 * static_cast<double>(s.rows * s.heads * (s.length + 1) * dim * esz);  // the slots read
    std::vector<Op> ops{
        {"LayerNorm (+ pending bias)", layer_norm, 3.0 * act * h, s.layers, false, true},
        {"product in (cuBLAS)", product_in, in_bytes, s.layers, false, true},
        {"attention+combine+GELU", attention, kv_bytes + 2.0 * act * s.ffn, s.layers, false, true},
        {"product out (cuBLAS)", product_out, out_bytes, s.layers, false, true},
        {"final LayerNorm", final_norm, 3.0 * act * h, 1, false, true},
        {"logits (cuBLAS)", product_logits, logit_bytes, 1, false, true},
    };
    if (fits) {
      ops.push_back({"LN + product in + GELU (gemv)", fused_in, in_bytes, s.layers, true, false});
      ops.push_back({"attention + MLP's product out", attention_mlp,
                     kv_bytes + static_cast<double>(h * s.ffn * esz), s.layers, true, false});
      ops.push_back({"attention's product out+bias", fused_out, static_cast<double>(h * h * esz), s.layers, true,
                     false});
      ops.push_back({"final LN + logits (gemv)", fused_logits, logit_bytes, 1, true, false});
    }
    double step_us = 0, fused_us = 0;
    for (auto& op : ops) {
      settle();
      op.us = time_us(op.fn, s.reps);
      if (op.unfused) step_us += op.us * static_cast<double>(op.count);
      if (op.fused) fused_us += op.us * static_cast<double>(op.count);
    }
    // What a step must read at least: every layer's two products' weights and the logits' matrix.
    const double weight_bytes = static_cast<double>(s.layers) * (in_bytes + out_bytes) + logit_bytes;
    const double limit_us = weight_bytes / bandwidth * 1e6;

    std::printf("native step operations: rows %lld, capacity %lld (%lld held), %lld layers, hidden %lld, %lld heads x %lld, "
                "ffn %lld, vocab %lld, %s, %lld launches per graph (cycling through %lld layers' tensors), "
                "early launch %s, %lld slots per attention block, keys and values prefetched %s\n",
                (long long)s.rows, (long long)s.capacity, (long long)s.length, (long long)s.layers, (long long)h, (long long)s.heads,
                (long long)dim, (long long)s.ffn, (long long)s.vocab, c10::toString(s.dtype), (long long)s.reps,
                (long long)s.layers, s.early_launch ? "on (sm_90 and later)" : "off", (long long)s.chunk,
                s.prefetch ? "yes" : "no (the whole step's lines prefetch)");
    std::printf("copy bandwidth %.2f TB/s (read + write, 512 MiB)\n\n", bandwidth / 1e12);
    std::printf("%-30s %10s %8s %12s %8s %8s\n", "operation", "us/launch", "TB/s", "us per step", "cuBLAS", "fused");
    for (const auto& op : ops) {
      const double per_step = op.us * static_cast<double>(op.count);
      const auto share = [&](bool in, double total) {
        return in ? std::to_string(static_cast<int>(std::lround(1000.0 * per_step / total)) / 10.0).substr(0, 4) + "%"
                  : std::string("-");
      };
      std::printf("%-30s %10.2f %8.2f %12.1f %8s %8s\n", op.name, op.us, op.bytes / (op.us * 1e-6) / 1e12, per_step,
                  share(op.unfused, step_us).c_str(), share(op.fused, fused_us).c_str());
    }
    std::printf("step estimate: cuBLAS step %.1f us (%.2fx the limit); fused step (gemv) %s\n", step_us,
                step_us / limit_us,
                fits ? (std::to_string(fused_us).substr(0, 7) + " us (" + std::to_string(fused_us / limit_us).substr(0, 4) +
                        "x the limit)").c_str()
                     : "does not fit this shape");
    std::printf("weight-streaming limit %.1f us (%.3f GB of weights at the copy bandwidth)\n", limit_us,
                weight_bytes / 1e9);
    settle();
    const double layer_us = time_us([&] { layer_norm(); product_in(); attention(); product_out(); }, s.reps);
    std::printf("\none layer replayed whole: cuBLAS %.2f us (its operations' sum %.2f)", layer_us,
                ops[0].us + ops[1].us + ops[2].us + ops[3].us);
    double layer_fused_us = 0;
    if (fits) {
      settle();
      layer_fused_us = time_us([&] { fused_in(); fused_second(); }, s.reps);
      std::printf(", fused %.2f us (sum %.2f)", layer_fused_us, ops[6].us + ops[7].us + ops[8].us);
    }
    std::printf("\n");

    if (!fits) return 0;

    // The fused products' largest difference from the unfused ones (LayerNorm kernel + cuBLAS),
    // relative to the largest value.
    std::printf("\n%-26s %22s\n", "fused product", "max |diff| / max |y|");
    const auto compare = [&](const char* name, const std::function<void()>& unfused,
                             const std::function<void()>& fused, const at::Tensor& y) {
      settle();
      const at::Tensor x0 = x.clone();
      layer_at = 0;
      unfused();
      const at::Tensor theirs = y.to(at::kFloat);
      x.copy_(x0);
      layer_at = 0;
      fused();
      const at::Tensor mine = y.to(at::kFloat);
      std::printf("%-26s %22.2e\n", name,
                  (mine - theirs).abs().max().item<double>() / theirs.abs().max().item<double>());
    };
    const auto norm_only = [&](bool affine) {
      kn::add_and_layer_norm(a.dtype, x.data_ptr(), nullptr, normed.data_ptr(), affine ? gamma.data_ptr() : nullptr,
                             affine ? beta.data_ptr() : nullptr, s.rows, h, 1e-5f, stream());
      check_launch("LayerNorm");
    };
    // The first product: its q/k/v columns, and the GELU of its MLP columns (after the bias).
    const auto gelu_reference = [&] {
      const at::Tensor mlp_in = (projected.narrow(1, 3 * h, s.ffn).to(at::kFloat) +
                                 b_in.narrow(0, 3 * h, s.ffn).to(at::kFloat)).to(s.dtype).to(at::kFloat);
      joined.narrow(1, h, s.ffn).copy_(at::gelu(mlp_in));
    };
    const at::Tensor qkv_columns = projected.narrow(1, 0, 3 * h), gelu_columns = joined.narrow(1, h, s.ffn);
    compare("LayerNorm + product in", [&] { norm_only(false); product_in(); }, fused_in, qkv_columns);
    compare("GELU of product in", [&] { norm_only(false); product_in(); gelu_reference(); }, fused_in, gelu_columns);
    // The second product over the joined row the attention writes ([o | gelu], the same in both).
    compare("product out + bias", [&] { attention_mlp(); layer_at = 0; product_out(); layer_norm(); }, fused_second, x);
    compare("final LayerNorm + logits", [&] { norm_only(true); product_logits(); }, fused_logits, logits);
    // The whole step (NativeStep::step on these weights, replayed from a graph as a decoder
    // replays it): what it spends beyond its layers and logits -- the embedding, the float32
    // copy of the logits, the gaps between unlike launches.
    setenv("KVC_NATIVE_GEMV", "1", 1);  // the fused products at any rows that fit them, as timed above
    setenv("KVC_NATIVE_PDL", s.early_launch ? "1" : "0", 1);
    setenv("KVC_NATIVE_CHUNK", std::to_string(s.chunk).c_str(), 1);
    rt::NativeStepModel model;
    model.name = "native_step_ops";
    model.num_layers = s.layers;
    model.num_heads = s.heads;
    model.head_dim = dim;
    model.rotary_ndims = s.rotary;
    model.parameters = {{"embed_in.weight", embed_out}, {"embed_out.weight", embed_out},
                        {"final_layer_norm.weight", gamma}, {"final_layer_norm.bias", beta}};
    for (int64_t l = 0; l < s.layers; ++l) {
      const std::string at_ = "layers." + std::to_string(l) + ".";
      model.parameters.emplace_back(at_ + "in_proj.weight", w_in[static_cast<size_t>(l)]);
      model.parameters.emplace_back(at_ + "in_proj.bias", b_in);
      model.parameters.emplace_back(at_ + "out_proj.weight", w_out[static_cast<size_t>(l)]);
      model.parameters.emplace_back(at_ + "out_proj.bias", b_out);
    }
    rt::NativeStep step(model);
    c10::List<at::Tensor> key_list, value_list;
    for (int64_t l = 0; l < s.layers; ++l) {
      key_list.push_back(keys[static_cast<size_t>(l)]);
      value_list.push_back(values[static_cast<size_t>(l)]);
    }
    const at::Tensor ids = at::zeros({s.rows, 1}, opts.dtype(at::kLong));
    const at::Tensor step_lengths = at::full({s.layers}, s.length, opts.dtype(at::kLong));
    constexpr int64_t kStepReps = 10;
    const double whole_us = time_us([&] { step.step(ids, positions, key_list, value_list, step_lengths); }, kStepReps);
    const double layers_us = layer_fused_us * static_cast<double>(s.layers) + ops[9].us;
    std::printf("\nwhole step (NativeStep::step, fused products): %.1f us; %lld layers replayed whole + the logits: "
                "%.1f us; the rest %.1f us\n",
                whole_us, (long long)s.layers, layers_us, whole_us - layers_us);
    // As a decoder runs it: one step and its greedy choice per replay, then also with the
    // decoder's work around each replay (StaticDecoder::upload_step_inputs: the lengths from
    // pinned memory and the positions' fill; the chosen id copied into the output).
    at::Tensor fed = ids.clone();
    const at::Tensor generated = at::zeros({s.rows, 256}, fed.options());
    rt::CudaGraph one;
    one.capture([&] {
      const at::Tensor logits = step.step(fed, positions, key_list, value_list, step_lengths);
      at::argmax_out(fed, logits.select(1, -1), -1, /*keepdim=*/true);
      return logits;
    }, 1);
    const auto decode_us = [&](bool with_uploads) {
      one.replay();
      rt::CudaEvents marks;
      marks.record();
      for (int64_t i = 0; i < generated.size(1); ++i) {
        if (with_uploads) {
          step_lengths.copy_(at::full({s.layers}, s.length, at::kLong).pin_memory(), /*non_blocking=*/true);
          positions.fill_(s.length);
        }
        one.replay();
        if (with_uploads) generated.narrow(1, i, 1).copy_(fed);
      }
      marks.record();
      return marks.seconds(0, 1) * 1e6 / static_cast<double>(generated.size(1));
    };
    const double replayed_us = decode_us(false), uploads_us = decode_us(true);
    std::printf("one step + greedy choice per replay: %.1f us; with the decoder's uploads and id copy: %.1f us\n",
                replayed_us, uploads_us);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "native_step_ops: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
