#pragma once
// Time marks on the device's own clock, for splitting a decode loop into steps and compression
// without stalling it: CUDA events recorded on the current stream and read after the loop (one
// synchronisation in all); on the CPU, where ops run synchronously, the host clock.
#include <kvcompress/types.hpp>

#include <ATen/ATen.h>

#include <chrono>
#include <memory>
#include <vector>

#ifdef KVC_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#endif

namespace kvcompress {
namespace runtime {

class Timeline {
 public:
  explicit Timeline(at::Device device) : cuda_(device.is_cuda()) {
#ifndef KVC_WITH_CUDA
    if (cuda_) throw Error("Timeline: this build of kvcompress has no CUDA support");
#endif
  }

  /// Records a mark after the work queued so far; returns its index.
  size_t mark() {
#ifdef KVC_WITH_CUDA
    if (cuda_) {
      events_.push_back(std::make_unique<at::cuda::CUDAEvent>(cudaEventDefault));  // timing on
      events_.back()->record();
      return events_.size() - 1;
    }
#endif
    host_.push_back(std::chrono::steady_clock::now());
    return host_.size() - 1;
  }

  size_t size() const {
#ifdef KVC_WITH_CUDA
    if (cuda_) return events_.size();
#endif
    return host_.size();
  }

  /// Seconds from mark `from` to mark `to`; waits for mark `to` to be reached.
  double seconds(size_t from, size_t to) const {
    if (from >= size() || to >= size()) throw Error("Timeline: no such mark");
#ifdef KVC_WITH_CUDA
    if (cuda_) {
      events_[to]->synchronize();
      return static_cast<double>(events_[from]->elapsed_time(*events_[to])) * 1e-3;
    }
#endif
    return std::chrono::duration<double>(host_[to] - host_[from]).count();
  }

 private:
  bool cuda_;
  std::vector<std::chrono::steady_clock::time_point> host_;
#ifdef KVC_WITH_CUDA
  std::vector<std::unique_ptr<at::cuda::CUDAEvent>> events_;
#endif
};

}  // namespace runtime
}  // namespace kvcompress
