// The native decode step (native_step.hpp): weights, checks and the layer loop around three
// operations -- add-bias-and-LayerNorm, the decode attention (with rotary, the in-place K/V
// write and the MLP input's GELU) and the two matrix products. On CUDA the first two are the
// kernels of native_step_kernels.cu, built with KVC_RUNTIME_NATIVE_STEP (a LibTorch with CUDA
// and the CUDA compiler, CMakeLists.txt); on the CPU they are ATen operators that round where
// the kernels round: the same algorithm, testable anywhere against the TorchScript step. At one
// row on CUDA the products are the kernels' gemv with those operations fused in
// (fused_products: three launches a layer, docs/PERFORMANCE.md).
#include <kvcompress/params.hpp>
#include <kvcompress/runtime/native_step.hpp>
#include <kvcompress/validate.hpp>

#include <ATen/ATen.h>

#if defined(KVC_RUNTIME_CUDA) && defined(KVC_RUNTIME_NATIVE_STEP)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "native_step_kernels_aten.hpp"
#define KVC_NATIVE_KERNELS 1
#endif

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

namespace kvcompress {
namespace runtime {

namespace {

// Slots per block of the split attention: small enough that a compressed cache of a few hundred
// slots still spreads over more blocks than the GPU has multiprocessors. KVC_NATIVE_CHUNK
// overrides it (read when the step is built), within [kMinChunk, kMaxChunk]: the block keeps a
// chunk's scores and partial dot products in shared memory.
constexpr int64_t kChunk = 64, kMinChunk = 8, kMaxChunk = 512;

void check_dtype(at::ScalarType t) {
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16)
    throw Error(std::string("native step: dtype ") + c10::toString(t) + " is not supported (float32, float16, bfloat16)");
}

#ifdef KVC_NATIVE_KERNELS
using kernels::kernel_dtype;

void check_launch(const char* what) {
  const std::string error = kernels::last_error();
  if (!error.empty()) throw Error(std::string("native step: ") + what + ": CUDA error: " + error);
}

// An error left by earlier work would otherwise be reported as the next launch's.
void check_nothing_pending() {
  const std::string error = kernels::last_error();
  if (!error.empty()) throw Error("native step: a CUDA error from earlier work (not this step) is pending: " + error);
}
#endif

// --- the CPU's operations: the kernels' arithmetic in ATen (float32, rounded to the model's
// dtype where the kernels round) ---------------------------------------------------------------

at::Tensor rounded(const at::Tensor& x, at::ScalarType dtype) { return x.to(dtype).to(at::kFloat); }

// x += pending (rounded), then out = LayerNorm(x) (* gamma + beta).
void add_and_layer_norm_cpu(const at::Tensor& x, const at::Tensor* pending, const at::Tensor& out,
                            const at::Tensor* gamma, const at::Tensor* beta, double eps) {
  if (pending) x.copy_(x.to(at::kFloat) + pending->to(at::kFloat));
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor centred = xf - xf.mean(-1, /*keepdim=*/true);
  at::Tensor v = centred * at::rsqrt(centred.pow(2).mean(-1, /*keepdim=*/true) + eps);
  if (gamma) v = v * gamma->to(at::kFloat);
  if (beta) v = v + beta->to(at::kFloat);
  out.copy_(v);
}

// GPT-NeoX partial rotary of x [H, D] at `position`, the factors and the result rounded.
at::Tensor rotate_cpu(const at::Tensor& x, int64_t rotary_ndims, double base, int64_t position, at::ScalarType dtype) {
  if (rotary_ndims == 0) return x;
  const int64_t half = rotary_ndims / 2;
  const at::Tensor i = at::arange(half, at::kFloat);
  const at::Tensor inv_freq = 1.0 / at::pow(at::full({}, static_cast<float>(base), at::kFloat), 2 * i / rotary_ndims);
  const at::Tensor angle = at::cat({inv_freq, inv_freq}) * static_cast<float>(position);
  const at::Tensor c = rounded(angle.cos(), dtype), s = rounded(angle.sin(), dtype);
  const at::Tensor r = x.narrow(-1, 0, rotary_ndims);
  const at::Tensor partner = at::cat({-r.narrow(-1, half, half), r.narrow(-1, 0, half)}, -1);
  return at::cat({rounded(r * c + partner * s, dtype), x.narrow(-1, rotary_ndims, x.size(-1) - rotary_ndims)}, -1);
}

}  // namespace

struct NativeStep::Impl {
  struct Layer {
    at::Tensor in_weight, in_bias, out_weight, out_bias;  // in: [3h + ffn, h]; out: [h, h + ffn]
  };
  NativeStepModel shape;
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kHalf;
  int64_t hidden = 0, ffn = 0, vocab = 0;
  std::vector<Layer> layers;
  at::Tensor embed_in, embed_out, final_weight, final_bias;
  // The step's scratch, one per lane (the current CUDA stream, or the calling thread on the CPU:
  // two callers at once must not share it), for the rows and capacity of its last use. A graph
  // captured on a scratch points into it for as long as the graph lives: every logits tensor the
  // step returns owns its scratch (step()), so a scratch replaced here for other rows or a larger
  // capacity lives on exactly while a graph's output (or a caller's logits) still holds it, and
  // other batch sizes leave nothing behind.
  struct Scratch {
    int64_t rows = 0, capacity = 0;
    at::Tensor x, normed, projected, joined, logits_model, partial, counters;
    at::Tensor mlp_sums;  // CUDA: the fused second product's MLP share, float32 [rows, hidden]
  };
  std::map<size_t, std::shared_ptr<Scratch>> scratch;
  std::mutex scratch_mutex;

  size_t lane() const {
#ifdef KVC_NATIVE_KERNELS
    if (device.is_cuda()) return static_cast<size_t>(c10::cuda::getCurrentCUDAStream().id());
#endif
    return std::hash<std::thread::id>()(std::this_thread::get_id());
  }

  std::shared_ptr<Scratch> scratch_for(int64_t rows, int64_t capacity) {
    const std::lock_guard<std::mutex> lock(scratch_mutex);
    std::shared_ptr<Scratch>& held = scratch[lane()];
    if (held && held->rows == rows && capacity <= held->capacity) return held;
    held = std::make_shared<Scratch>();
    Scratch& s = *held;
    s.rows = rows;
    const auto opts = at::TensorOptions().dtype(dtype).device(device);
    s.capacity = capacity;
    s.x = at::empty({rows, hidden}, opts);
    s.normed = at::empty({rows, hidden}, opts);
    s.projected = at::empty({rows, 3 * hidden + ffn}, opts);
    s.joined = at::empty({rows, hidden + ffn}, opts);
    s.logits_model = at::empty({rows, vocab}, opts);
    const int64_t splits = (capacity + chunk - 1) / chunk;  // the CUDA attention's per-split results
    if (device.is_cuda()) {
      s.partial = at::empty({rows * shape.num_heads * splits * (shape.head_dim + 2)}, opts.dtype(at::kFloat));
      s.counters = at::zeros({rows * shape.num_heads}, opts.dtype(at::kInt));  // the attention leaves them zero
      s.mlp_sums = at::empty({rows, hidden}, opts.dtype(at::kFloat));
    }
    return held;
  }

  // The fused products: kvcompress's gemv kernel instead of cuBLAS, each LayerNorm fused into
  // the product that reads it and the output bias into the product before it -- three launches
  // a layer. For up to gemv_rows rows: 1 by default (faster than cuBLAS at one row on an H100,
  // 2-3x slower at 8: docs/PERFORMANCE.md); KVC_NATIVE_GEMV=0 never, =1 up to
  // kernels::kMaxGemvRows (read when the step is built). CUDA only, and only where the weights
  // allow 16-byte loads (weights_aligned).
  int64_t gemv_rows = 1;
  bool weights_aligned = false;
  // The kernels launched early where the card allows (programmatic dependent launch, sm_90 and
  // later: each kernel's blocks start while the previous kernel finishes, and wait for it).
  // KVC_NATIVE_PDL=0 launches them plainly (read when the step is built).
  bool early_launch = true;
  int64_t chunk = kChunk;  // slots per block of the attention

  bool fused_products(int64_t rows) const {
#ifdef KVC_NATIVE_KERNELS
    // The second product runs as two (the attention's side product over the MLP's columns, then
    // the attention's columns): each slice of k in whole 16-byte loads.
    const auto kt = kernel_dtype(dtype);
    return rows <= gemv_rows && weights_aligned && device.is_cuda() && kernels::gemv_fits(kt, rows, hidden, true) &&
           kernels::gemv_fits(kt, rows, ffn, false);
#else
    (void)rows;
    return false;
#endif
  }

#ifdef KVC_NATIVE_KERNELS
  // The fused products' arguments (fused_products): out = [LayerNorm](in) . weight^T, the rest
  // set by the caller.
  kernels::GemvArgs product_args(const at::Tensor& out, const at::Tensor& in, const at::Tensor& weight) const {
    kernels::GemvArgs g = kernels::gemv_args(out, in, weight);
    g.eps = static_cast<float>(shape.layer_norm_eps);
    g.early_launch = early_launch;
    return g;
  }

  void launch_product(const kernels::GemvArgs& g, const char* what) const {
    if (!kernels::gemv(g, c10::cuda::getCurrentCUDAStream().stream()))  // fused_products() said it fits
      throw Error(std::string("native step: internal error: the gemv kernel refused the ") + what + " of " +
                  std::to_string(g.rows) + " rows, " + std::to_string(g.n) + " x " + std::to_string(g.k));
    check_launch(what);
  }
#endif

  // x += pending; normed = LayerNorm(x) (* gamma + beta).
  void add_and_layer_norm(Scratch& w, const at::Tensor* pending, const at::Tensor* gamma, const at::Tensor* beta) const {
#ifdef KVC_NATIVE_KERNELS
    if (device.is_cuda()) {
      kernels::add_and_layer_norm(kernel_dtype(dtype), w.x.data_ptr(), pending ? pending->data_ptr() : nullptr,
                                  w.normed.data_ptr(), gamma ? gamma->data_ptr() : nullptr,
                                  beta ? beta->data_ptr() : nullptr, w.x.size(0), hidden,
                                  static_cast<float>(shape.layer_norm_eps), c10::cuda::getCurrentCUDAStream().stream());
      check_launch(gamma ? "final LayerNorm" : "LayerNorm");
      return;
    }
#endif
    add_and_layer_norm_cpu(w.x, pending, w.normed, gamma, beta, shape.layer_norm_eps);
  }

#ifdef KVC_NATIVE_KERNELS
  // The decode attention kernel's arguments for layer l over its buffers into joined[:, :hidden]
  // (the product's bias added, rotary applied, the new key and value written at each row's
  // length); the caller adds what its other blocks do (carry or side_product).
  kernels::AttentionArgs attention_args(int64_t l, const Layer& layer, const at::Tensor& keys, const at::Tensor& values,
                                        const at::Tensor& lengths, const at::Tensor& position_ids,
                                        const at::Tensor* bias, Scratch& w) const {
    const bool per_row = lengths.dim() == 2, per_layer = position_ids.dim() == 3;
    kernels::AttentionArgs a;
    a.dtype = kernel_dtype(dtype);
    a.rows = w.x.size(0);
    a.heads = shape.num_heads;
    a.head_dim = shape.head_dim;
    a.capacity = keys.size(2);
    a.qkv = w.projected.data_ptr();
    a.qkv_stride = w.projected.size(1);
    a.qkv_bias = layer.in_bias.data_ptr();
    a.keys = keys.data_ptr();
    a.values = values.data_ptr();
    a.vectorized = (a.head_dim * keys.element_size()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(keys.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(values.data_ptr()) % 16 == 0;
    a.lengths = lengths.data_ptr<int64_t>() + (per_row ? l * a.rows : l);
    a.lengths_stride = per_row ? 1 : 0;
    a.positions = position_ids.data_ptr<int64_t>() + (per_layer ? l * position_ids.stride(0) : 0);
    a.positions_stride = per_layer ? position_ids.stride(1) : position_ids.stride(0);
    a.rotary_ndims = shape.rotary_ndims;
    a.rotary_base = static_cast<float>(shape.rotary_base);
    a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(a.head_dim)));
    a.slot_bias = bias ? bias->data_ptr() : nullptr;
    a.chunk = chunk;
    a.splits = (a.capacity + chunk - 1) / chunk;
    a.partial = w.partial.data_ptr<float>();
    a.counters = w.counters.data_ptr<int>();
    a.out = w.joined.data_ptr();
    a.out_stride = w.joined.size(1);
    a.early_launch = early_launch;
    return a;
  }

  void launch_attention(const kernels::AttentionArgs& a, int64_t l) const {
    if (!kernels::decode_attention(a, c10::cuda::getCurrentCUDAStream().stream()))  // step() checked the grid
      throw Error("native step: internal error: the decode attention refused layer " + std::to_string(l) + "'s launch");
    check_launch("decode attention");
  }
#endif

  // Layer l's attention over its buffers into joined[:, :hidden] (the product's bias added,
  // rotary applied, the new key and value written at each row's length), and GELU of the MLP's
  // input into joined[:, hidden:].
  void attention(int64_t l, const Layer& layer, const at::Tensor& keys, const at::Tensor& values,
                 const at::Tensor& lengths, const at::Tensor& position_ids, const at::Tensor* bias, Scratch& w) const {
#ifdef KVC_NATIVE_KERNELS
    if (device.is_cuda()) {
      kernels::AttentionArgs a = attention_args(l, layer, keys, values, lengths, position_ids, bias, w);
      a.carry = static_cast<const char*>(w.projected.data_ptr()) + 3 * hidden * w.projected.element_size();
      a.carry_bias = static_cast<const char*>(layer.in_bias.data_ptr()) + 3 * hidden * layer.in_bias.element_size();
      a.carry_cols = ffn;
      a.carry_out = static_cast<char*>(w.joined.data_ptr()) + hidden * w.joined.element_size();
      launch_attention(a, l);
      return;
    }
#endif
    const int64_t rows = w.x.size(0), heads = shape.num_heads, dim = shape.head_dim;
    const bool per_row = lengths.dim() == 2, per_layer = position_ids.dim() == 3;
    const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
    const at::Tensor y = rounded(w.projected.to(at::kFloat) + layer.in_bias.to(at::kFloat), dtype);
    const at::Tensor qkv = y.narrow(1, 0, 3 * hidden).view({rows, heads, 3, dim});
    const at::Tensor lens = per_row ? lengths[l] : lengths[l].expand({rows});
    const at::Tensor pos = (per_layer ? position_ids[l] : position_ids).reshape({rows});
    const int64_t capacity = keys.size(2);
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t len = lens[b].item<int64_t>();
      if (len < 0 || len >= capacity)  // the kernels' device-side trap, as an error here
        throw Error("native step: row " + std::to_string(b) + " of layer " + std::to_string(l) + " holds " +
                    std::to_string(len) + " of its " + std::to_string(capacity) + " slots: no room for the new token");
      const int64_t position = pos[b].item<int64_t>();
      const at::Tensor row = qkv[b];  // [H, 3, D]
      const at::Tensor q = rotate_cpu(row.select(1, 0), shape.rotary_ndims, shape.rotary_base, position, dtype);
      const at::Tensor k = rotate_cpu(row.select(1, 1), shape.rotary_ndims, shape.rotary_base, position, dtype);
      keys[b].select(1, len).copy_(k);
      values[b].select(1, len).copy_(row.select(1, 2));
      at::Tensor scores = at::bmm(keys[b].narrow(1, 0, len + 1).to(at::kFloat), q.unsqueeze(-1)).squeeze(-1) * scale;
      if (bias) scores.add_((*bias)[b].narrow(1, 0, len + 1).to(at::kFloat));  // every slot, the new one too
      const at::Tensor p = at::softmax(scores, -1);  // [H, len + 1]
      const at::Tensor o = at::bmm(p.unsqueeze(1), values[b].narrow(1, 0, len + 1).to(at::kFloat)).squeeze(1);
      w.joined[b].narrow(0, 0, hidden).copy_(o.reshape({hidden}));
    }
    w.joined.narrow(1, hidden, ffn).copy_(at::gelu(y.narrow(1, 3 * hidden, ffn)));
  }
};

namespace {

// A 0/1 switch from the environment: unset gives nothing, any other value is an error.
std::optional<bool> switch_from_env(const char* name) {
  const char* value = std::getenv(name);
  if (!value) return std::nullopt;
  const std::string v = value;
  if (v != "0" && v != "1") throw Error(std::string("native step: ") + name + " must be 0 or 1, got '" + v + "'");
  return v == "1";
}

at::Tensor take(const std::map<std::string, at::Tensor>& p, const std::string& name, const std::string& model) {
  auto it = p.find(name);
  if (it == p.end())
    throw Error("native step: model '" + model + "' has no parameter '" + name +
                "' (a GPT-NeoX contract model from export_pythia.py or export_small_model.py is expected)");
  return it->second;
}

}  // namespace

NativeStep::NativeStep(const NativeStepModel& model) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.shape = model;
  m.shape.parameters.clear();
  if (!model.parallel_residual)
    throw Error("native step: model '" + model.name + "' has sequential residual layers; the native step computes "
                "GPT-NeoX's parallel residual (every Pythia model)");
  if (model.head_dim < 1 || model.head_dim > 256 || model.rotary_ndims % 2 != 0 || model.rotary_ndims > model.head_dim)
    throw Error("native step: model '" + model.name + "' has head_dim " + std::to_string(model.head_dim) +
                " and rotary_ndims " + std::to_string(model.rotary_ndims) +
                "; it supports head_dim up to 256 and an even rotary_ndims <= head_dim");
  std::map<std::string, at::Tensor> p(model.parameters.begin(), model.parameters.end());
  m.embed_in = take(p, "embed_in.weight", model.name);
  m.device = m.embed_in.device();
  m.dtype = m.embed_in.scalar_type();
  check_dtype(m.dtype);
  if (const auto own = switch_from_env("KVC_NATIVE_GEMV")) {
#ifdef KVC_NATIVE_KERNELS
    m.gemv_rows = *own ? kernels::kMaxGemvRows : 0;
#endif
  }
  if (const auto early = switch_from_env("KVC_NATIVE_PDL")) m.early_launch = *early;
  if (const char* chunk = std::getenv("KVC_NATIVE_CHUNK")) {
    int64_t v = 0;
    if (!params::parse_int(chunk, v) || v < kMinChunk || v > kMaxChunk)
      throw Error("native step: KVC_NATIVE_CHUNK must be an integer in [" + std::to_string(kMinChunk) + ", " +
                  std::to_string(kMaxChunk) + "] (slots per block of the attention), got '" + chunk + "'");
    m.chunk = v;
  }
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
#ifndef KVC_NATIVE_KERNELS
  if (m.device.is_cuda())
    throw Error("native step: this build of kvcompress::runtime has no CUDA kernels for it (they need a LibTorch "
                "with CUDA and the CUDA compiler at build time), so model '" + model.name + "' on " + m.device.str() +
                " can only run its TorchScript step");
#endif
  if (!m.device.is_cuda() && !m.device.is_cpu())
    throw Error("native step: model '" + model.name + "' is on " + m.device.str() + "; it runs on CUDA and the CPU");
  m.hidden = model.num_heads * model.head_dim;
#ifdef KVC_NATIVE_KERNELS
  if (m.device.is_cuda() && !kernels::attention_fits(kernel_dtype(m.dtype), model.head_dim, m.chunk))
    throw Error("native step: KVC_NATIVE_CHUNK=" + std::to_string(m.chunk) + " slots of head_dim " +
                std::to_string(model.head_dim) + " in " + c10::toString(m.dtype) +
                " do not fit the attention's shared memory; take fewer");
#endif
  const c10::DeviceGuard guard(m.device);
  c10::InferenceMode inference;
  // The kernels read raw bytes of the model's dtype: every tensor they read in it, contiguous,
  // and of the shape they assume (a float32 bias beside float16 weights, or a mis-sized one,
  // would be read as garbage, not refused).
  auto as_read = [&](at::Tensor t, const std::string& name, std::vector<int64_t> shape) {
    if (t.sizes() != at::IntArrayRef(shape))
      throw Error("native step: model '" + model.name + "' parameter '" + name + "' is " + detail::shape_text(t) +
                  ", expected " + detail::shape_text(at::empty(shape, at::kFloat)) + " (hidden size " +
                  std::to_string(m.hidden) + ")");
    return t.to(m.dtype).contiguous();
  };
  m.embed_in = as_read(m.embed_in, "embed_in.weight", {m.embed_in.size(0), m.hidden});
  const at::Tensor embed_out = take(p, "embed_out.weight", model.name);
  m.vocab = embed_out.size(0);
  m.embed_out = as_read(embed_out, "embed_out.weight", {m.vocab, m.hidden});
  m.final_weight = as_read(take(p, "final_layer_norm.weight", model.name), "final_layer_norm.weight", {m.hidden});
  m.final_bias = as_read(take(p, "final_layer_norm.bias", model.name), "final_layer_norm.bias", {m.hidden});
  for (int64_t l = 0; l < model.num_layers; ++l) {
    const std::string at_ = "layers." + std::to_string(l) + ".";
    Impl::Layer layer;
    if (p.count(at_ + "in_proj.weight")) {  // fused export: the folded weights as they are
      layer.in_weight = take(p, at_ + "in_proj.weight", model.name);
      layer.in_bias = take(p, at_ + "in_proj.bias", model.name);
      layer.out_weight = take(p, at_ + "out_proj.weight", model.name);
      layer.out_bias = take(p, at_ + "out_proj.bias", model.name);
    } else {  // plain layers: fold as FusedNeoXLayer does, in float64, rounded once
      auto fold = [&](const std::string& lin, const std::string& ln, at::Tensor& w, at::Tensor& b) {
        const at::Tensor weight = take(p, at_ + lin + ".weight", model.name).to(at::kDouble);
        w = weight * take(p, at_ + ln + ".weight", model.name).to(at::kDouble).unsqueeze(0);
        b = take(p, at_ + lin + ".bias", model.name).to(at::kDouble) +
            at::mv(weight, take(p, at_ + ln + ".bias", model.name).to(at::kDouble));
      };
      at::Tensor w_qkv, b_qkv, w_up, b_up;
      fold("attention.query_key_value", "input_layernorm", w_qkv, b_qkv);
      fold("mlp.dense_h_to_4h", "post_attention_layernorm", w_up, b_up);
      // Rounded to the model's dtype once, with every layer's tensors, below.
      layer.in_weight = at::cat({w_qkv, w_up}, 0);
      layer.in_bias = at::cat({b_qkv, b_up}, 0);
      layer.out_weight = at::cat({take(p, at_ + "attention.dense.weight", model.name),
                                  take(p, at_ + "mlp.dense_4h_to_h.weight", model.name)}, 1);
      layer.out_bias = take(p, at_ + "attention.dense.bias", model.name).to(at::kDouble) +
                       take(p, at_ + "mlp.dense_4h_to_h.bias", model.name).to(at::kDouble);
    }
    const int64_t ffn = layer.in_weight.size(0) - 3 * m.hidden;
    if (layer.in_weight.dim() != 2 || layer.in_weight.size(1) != m.hidden || ffn < 1 ||
        layer.out_weight.sizes() != at::IntArrayRef({m.hidden, m.hidden + ffn}) || (l > 0 && ffn != m.ffn))
      throw Error("native step: model '" + model.name + "' layer " + std::to_string(l) + " has projections " +
                  detail::shape_text(layer.in_weight) + " and " + detail::shape_text(layer.out_weight) +
                  ", which do not fit hidden size " + std::to_string(m.hidden));
    layer.in_weight = layer.in_weight.to(m.dtype).contiguous();
    layer.out_weight = layer.out_weight.to(m.dtype).contiguous();
    layer.in_bias = as_read(layer.in_bias, at_ + "in_proj.bias", {3 * m.hidden + ffn});
    layer.out_bias = as_read(layer.out_bias, at_ + "out_proj.bias", {m.hidden});
    m.ffn = ffn;
    m.layers.push_back(std::move(layer));
  }
  m.weights_aligned = aligned(m.embed_out);
  for (const Impl::Layer& layer : m.layers)
    m.weights_aligned = m.weights_aligned && aligned(layer.in_weight) && aligned(layer.out_weight);
}

NativeStep::~NativeStep() = default;
NativeStep::NativeStep(NativeStep&&) noexcept = default;
NativeStep& NativeStep::operator=(NativeStep&&) noexcept = default;

at::Tensor NativeStep::step(const at::Tensor& input_ids, const at::Tensor& position_ids,
                            const c10::List<at::Tensor>& key_buffers, const c10::List<at::Tensor>& value_buffers,
                            const at::Tensor& lengths, const c10::List<at::Tensor>& slot_bias) {
  Impl& m = *impl_;
  const int64_t layers = m.shape.num_layers, heads = m.shape.num_heads, dim = m.shape.head_dim;
  const std::string who = "native step: ";
  if (static_cast<int64_t>(key_buffers.size()) != layers || value_buffers.size() != key_buffers.size() ||
      (!slot_bias.empty() && slot_bias.size() != key_buffers.size()))
    throw Error(who + std::to_string(key_buffers.size()) + " key, " + std::to_string(value_buffers.size()) +
                " value and " + std::to_string(slot_bias.size()) + " slot_bias buffers for " + std::to_string(layers) +
                " layers");
  const int64_t rows = key_buffers.get(0).dim() == 4 ? key_buffers.get(0).size(0) : 0;
  if (rows < 1) throw Error(who + "layer 0's key buffer " + detail::shape_text(key_buffers.get(0)) + " holds no row");
  int64_t capacity = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor k = key_buffers.get(l), v = value_buffers.get(l);
    if (k.dim() != 4 || k.size(0) != rows || k.size(1) != heads || k.size(3) != dim || k.size(2) < 1 ||
        v.sizes() != k.sizes() || k.scalar_type() != m.dtype || v.scalar_type() != m.dtype || k.device() != m.device ||
        v.device() != m.device || !k.is_contiguous() || !v.is_contiguous())
      throw Error(who + "layer " + std::to_string(l) + " buffers are keys " + detail::shape_text(k) + " and values " +
                  detail::shape_text(v) + "; both must be contiguous [" + std::to_string(rows) + ", " +
                  std::to_string(heads) + ", C, " + std::to_string(dim) + "] " + c10::toString(m.dtype) + " on " +
                  m.device.str() + " (every layer the same rows)");
    if (!slot_bias.empty()) {
      const at::Tensor b = slot_bias.get(l);
      if (b.dim() != 3 || b.sizes() != k.sizes().slice(0, 3) || b.scalar_type() != m.dtype || b.device() != m.device ||
          !b.is_contiguous())
        throw Error(who + "layer " + std::to_string(l) + "'s slot_bias is " + detail::shape_text(b) +
                    "; it must be contiguous [B, H, C] like its key buffer " + detail::shape_text(k));
    }
    capacity = std::max(capacity, k.size(2));
  }
  // The attention's grid: a block per (row, head, split of m.chunk slots), then the GELU's or
  // the side product's blocks (at most one per output) (CUDA's limit).
  if (m.device.is_cuda() && rows * heads * ((capacity + m.chunk - 1) / m.chunk) +
                                    std::max((rows * m.ffn + 127) / 128, m.hidden) >
                                std::numeric_limits<int32_t>::max())
    throw Error(who + std::to_string(rows) + " rows of " + std::to_string(capacity) +
                " slots exceed the kernels' launch grid (2^31 - 1 blocks of " + std::to_string(m.chunk) +
                " slots of one row's head)");
  const bool per_row = lengths.dim() == 2;
  if (lengths.scalar_type() != at::kLong || lengths.device() != m.device || !lengths.is_contiguous() ||
      !((lengths.dim() == 1 && lengths.size(0) == layers) || (per_row && lengths.size(0) == layers && lengths.size(1) == rows)))
    throw Error(who + "lengths " + detail::shape_text(lengths) + " must be contiguous int64 [" + std::to_string(layers) +
                "] or [" + std::to_string(layers) + ", " + std::to_string(rows) + "] on " + m.device.str());
  const bool per_layer = position_ids.dim() == 3;
  if (position_ids.scalar_type() != at::kLong || position_ids.device() != m.device ||
      !((position_ids.dim() == 2 && position_ids.size(0) == rows && position_ids.size(1) == 1) ||
        (per_layer && position_ids.size(0) == layers && position_ids.size(1) == rows && position_ids.size(2) == 1)))
    throw Error(who + "position_ids " + detail::shape_text(position_ids) + " must be int64 [" + std::to_string(rows) +
                ", 1] or [" + std::to_string(layers) + ", " + std::to_string(rows) + ", 1] on " + m.device.str() +
                " (one new token per row)");
  if (input_ids.scalar_type() != at::kLong || input_ids.device() != m.device || input_ids.dim() != 2 ||
      input_ids.size(1) != 1 || (input_ids.size(0) != rows && input_ids.size(0) != 1))
    throw Error(who + "input_ids " + detail::shape_text(input_ids) + " must be int64 [" + std::to_string(rows) +
                ", 1] or [1, 1] on " + m.device.str() + " (one new token per row)");

  const c10::DeviceGuard guard(m.device);
#ifdef KVC_NATIVE_KERNELS
  if (m.device.is_cuda()) check_nothing_pending();
#endif
  // Inside or outside the caller's inference mode alike: the scratch outlives this call.
  c10::InferenceMode inference;
  const std::shared_ptr<Impl::Scratch> held = m.scratch_for(rows, capacity);
  Impl::Scratch& w = *held;
  const at::Tensor embedded = at::index_select(m.embed_in, 0, input_ids.reshape({-1}));
  w.x.copy_(embedded.size(0) == rows ? embedded : embedded.expand({rows, m.hidden}));
  [[maybe_unused]] const bool fused = m.fused_products(rows);
  const at::Tensor* pending = nullptr;
  for (int64_t l = 0; l < layers; ++l) {
    const Impl::Layer& layer = m.layers[static_cast<size_t>(l)];
    const at::Tensor bias = slot_bias.empty() ? at::Tensor() : slot_bias.get(l);
#ifdef KVC_NATIVE_KERNELS
    if (fused) {
      // LayerNorm + the first product, GELU of its MLP columns into joined[:, hidden:].
      kernels::GemvArgs in = m.product_args(w.projected, w.x, layer.in_weight);
      in.layer_norm = true;
      in.gelu_from = 3 * m.hidden;
      in.gelu_bias = static_cast<const char*>(layer.in_bias.data_ptr()) + in.gelu_from * layer.in_bias.element_size();
      in.gelu_out = static_cast<char*>(w.joined.data_ptr()) + m.hidden * w.joined.element_size();
      in.gelu_stride = w.joined.stride(0);
      m.launch_product(in, "LayerNorm + first product");
      // The attention, and in its grid the MLP's share of the second product (float32 sums).
      kernels::GemvArgs mlp = m.product_args(w.mlp_sums, w.joined.narrow(1, m.hidden, m.ffn),
                                             layer.out_weight.narrow(1, m.hidden, m.ffn));
      mlp.sums = w.mlp_sums.data_ptr<float>();
      mlp.sums_stride = w.mlp_sums.stride(0);
      kernels::AttentionArgs a = m.attention_args(l, layer, key_buffers.get(l), value_buffers.get(l), lengths,
                                                  position_ids, bias.defined() ? &bias : nullptr, w);
      a.has_side_product = true;
      a.side_product = mlp;
      m.launch_attention(a, l);
      // The attention's share + the MLP's sums + the residual, rounded once, + the bias.
      kernels::GemvArgs out = m.product_args(w.x, w.joined.narrow(1, 0, m.hidden), layer.out_weight.narrow(1, 0, m.hidden));
      out.addend = mlp.sums;
      out.addend_stride = mlp.sums_stride;
      out.accumulate = true;
      out.bias = layer.out_bias.data_ptr();
      m.launch_product(out, "second product");
      continue;
    }
#endif
    m.add_and_layer_norm(w, pending, nullptr, nullptr);
    at::mm_out(w.projected, w.normed, layer.in_weight.t());  // its bias added by the attention
    m.attention(l, layer, key_buffers.get(l), value_buffers.get(l), lengths, position_ids,
                bias.defined() ? &bias : nullptr, w);
    w.x.addmm_(w.joined, layer.out_weight.t());  // residual + attention and MLP outputs, bias pending
    pending = &layer.out_bias;
  }
#ifdef KVC_NATIVE_KERNELS
  if (fused) {
    kernels::GemvArgs logits = m.product_args(w.logits_model, w.x, m.embed_out);
    logits.layer_norm = true;
    logits.gamma = m.final_weight.data_ptr();
    logits.beta = m.final_bias.data_ptr();
    m.launch_product(logits, "final LayerNorm + logits");
  } else
#endif
  {
    m.add_and_layer_norm(w, pending, &m.final_weight, &m.final_bias);
    at::mm_out(w.logits_model, w.normed, m.embed_out.t());
  }
  // A tensor of the caller's own (a graph's memory when captured), not the shared scratch; it
  // keeps the scratch alive while it lives (a graph replays into the scratch it captured).
  const at::Tensor logits = w.logits_model.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  return at::for_blob(logits.data_ptr(), {rows, 1, m.vocab})
      .deleter([keep = std::make_pair(held, logits)](void*) {})
      .options(logits.options())
      .target_device(logits.device())  // named: no device query of the pointer
      .make_tensor();
}

}  // namespace runtime
}  // namespace kvcompress
