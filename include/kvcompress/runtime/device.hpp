#pragma once
// What the runtime needs of CUDA beyond ATen's device-generic API: graph capture and replay,
// device-clock events, allocator statistics. Declared here without any CUDA type or macro, and
// defined once in the compiled part of kvcompress::runtime (src/device.cpp), which is built with
// CUDA when LibTorch has it: every translation unit of a program sees the same classes.
#include <kvcompress/types.hpp>

#include <functional>
#include <memory>

namespace kvcompress {
namespace runtime {

/// Whether this build of kvcompress::runtime has CUDA support (LibTorch with CUDA at build time).
bool built_with_cuda();

/// One CUDA graph: `capture(fn)` runs fn a few times on a side stream (warm-up), then records
/// one call; `replay()` launches the recorded kernels again on the same memory.
class CudaGraph {
 public:
  CudaGraph();
  ~CudaGraph();
  CudaGraph(CudaGraph&&) noexcept;
  CudaGraph& operator=(CudaGraph&&) noexcept;

  bool captured() const;
  /// Returns the captured call's result, whose memory the graph owns (replays overwrite it).
  at::Tensor capture(const std::function<at::Tensor()>& fn, int warmup = 3);
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Timing marks recorded on the current CUDA stream (events with timing on).
class CudaEvents {
 public:
  CudaEvents();
  ~CudaEvents();
  CudaEvents(CudaEvents&&) noexcept;
  CudaEvents& operator=(CudaEvents&&) noexcept;

  size_t record();
  size_t size() const;
  /// Seconds between marks `from` and `to`; waits for `to`.
  double seconds(size_t from, size_t to) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The CUDA caching allocator's peak of allocated bytes on `device` since the last reset.
int64_t cuda_peak_allocated_bytes(int device);
void cuda_reset_peak(int device);
/// Bytes the CUDA caching allocator holds for live tensors now (-1 without CUDA).
int64_t cuda_allocated_bytes(int device);
/// The device's memory in bytes (-1 without CUDA).
int64_t cuda_total_bytes(int device);
/// Caps what the CUDA caching allocator may reserve on `device` at `bytes` (its memory
/// fraction): beyond it allocations fail as when the device is full. Throws without CUDA.
void cuda_limit_bytes(int device, int64_t bytes);
/// Gives the allocator's cached free blocks back to the driver (nothing without CUDA).
void cuda_release_cached();

}  // namespace runtime
}  // namespace kvcompress
