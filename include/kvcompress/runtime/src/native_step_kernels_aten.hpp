#pragma once
// The native step's kernels seen from ATen: their dtype and a product's arguments from tensors.
// Shared by native_step.cpp and bench/native_step_ops.cpp (the kernels' own header has no ATen).
#include "native_step_kernels.cuh"

#include <ATen/ATen.h>

namespace kvcompress {
namespace runtime {
namespace kernels {

inline DType kernel_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::f32 : t == at::kHalf ? DType::f16 : DType::bf16;
}

/// gemv's arguments for out = in . weight^T (weight [n, k] with unit column stride: a matrix or
/// a slice of its columns; one row of in per row of out); the caller sets what it fuses.
inline GemvArgs gemv_args(const at::Tensor& out, const at::Tensor& in, const at::Tensor& weight) {
  GemvArgs g;
  g.dtype = kernel_dtype(weight.scalar_type());
  g.x = in.data_ptr();
  g.x_stride = in.stride(0);
  g.w = weight.data_ptr();
  g.w_stride = weight.stride(0);
  g.rows = in.size(0);
  g.n = weight.size(0);
  g.k = weight.size(1);
  g.y = out.data_ptr();
  g.y_stride = out.stride(0);
  return g;
}

}  // namespace kernels
}  // namespace runtime
}  // namespace kvcompress
