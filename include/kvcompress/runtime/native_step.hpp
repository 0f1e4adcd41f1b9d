#pragma once
// The one-token decode step of a GPT-NeoX (Pythia) contract model in kvcompress's own CUDA
// kernels, beside the TorchScript `step` (the reference, and the CPU path). Per layer, at one
// row (the latency case), three launches where the TorchScript step launches about twelve:
// one matrix product normalises the residual and computes QKV and the MLP's input, GELU applied
// as it writes the latter (the LayerNorms folded into the weights, as export_pythia.py
// --fuse-layers does); one launch runs the split-K decode attention (rotary, the new key and
// value written in place, attention over the fixed-capacity cache, its splits combined) and,
// in blocks of the same grid, the MLP's share of the output product, whose weights stream while
// the latency-bound attention runs; one matrix product adds the attention's share, that share
// and the bias into the residual. On sm_90 and later each kernel launches while the previous
// one finishes (programmatic dependent launch). Larger batches
// normalise in a kernel of their own and multiply in cuBLAS. KVC_NATIVE_GEMV, KVC_NATIVE_PDL and
// KVC_NATIVE_CHUNK tune it (docs/PERFORMANCE.md).
// On the CPU the same algorithm runs in ATen operators, rounding where the kernels round: not a
// fast path (the TorchScript step stays the CPU's), but the kernels' arithmetic checkable
// against the TorchScript step on any machine (folded weights, layouts, rotary, masks).
//
// Declared without CUDA types; defined in the compiled part of kvcompress::runtime
// (src/native_step.cpp, src/native_step_kernels.cu), the kernels built when LibTorch has CUDA
// and the CUDA compiler is found.
#include <kvcompress/types.hpp>

#include <ATen/core/List.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace kvcompress {
namespace runtime {

/// What the native step reads of a model: its shape, its config's LayerNorm epsilon and
/// residual form, and its parameters by TorchScript name (plain `layers.i.attention...` or
/// fused `layers.i.in_proj...` layers).
struct NativeStepModel {
  std::string name;
  int64_t num_layers = 0, num_heads = 0, head_dim = 0, rotary_ndims = 0;
  double rotary_base = 10000.0, layer_norm_eps = 1e-5;
  bool parallel_residual = true;
  std::vector<std::pair<std::string, at::Tensor>> parameters;
};

class NativeStep {
 public:
  /// Takes (plain layers: folds) the weights on their device. Throws kvcompress::Error naming
  /// the reason when the step cannot run: a CUDA model in a build without the kernels, a device
  /// other than CUDA or the CPU, a missing parameter, layers without parallel residual, a head
  /// wider than 256.
  explicit NativeStep(const NativeStepModel& model);
  ~NativeStep();
  NativeStep(NativeStep&&) noexcept;
  NativeStep& operator=(NativeStep&&) noexcept;

  /// The contract's `step` for one new token per row (docs/MODEL_CONTRACT.md): ids [B, 1] (or
  /// [1, 1]: every row feeds it), position_ids [B, 1] or [L, B, 1], buffers [B, H, C_l, D] per
  /// layer, lengths [L] or [L, B] (int64, on the model's device); `slot_bias` (optional) per
  /// layer [B, H, C_l], added to the scores of every slot, the new token's too (as the
  /// contract's step_scored adds it). Writes each row's new key and value at slot
  /// lengths[l](, b) (a length outside the buffer stops the kernel with a device-side trap, and
  /// is an error on the CPU: StaticDecoder makes room first) and returns float32 logits
  /// [B, 1, vocab]. On CUDA capturable in a graph: no host synchronisation.
  at::Tensor step(const at::Tensor& input_ids, const at::Tensor& position_ids, const c10::List<at::Tensor>& key_buffers,
                  const c10::List<at::Tensor>& value_buffers, const at::Tensor& lengths,
                  const c10::List<at::Tensor>& slot_bias = c10::List<at::Tensor>());

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace runtime
}  // namespace kvcompress
