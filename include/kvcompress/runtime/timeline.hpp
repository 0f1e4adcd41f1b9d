#pragma once
// Time marks on the device's own clock, for splitting a decode loop into steps and compression
// without stalling it: CUDA events recorded on the current stream and read after the loop (one
// synchronisation in all); on the CPU, where ops run synchronously, the host clock.
#include <kvcompress/runtime/device.hpp>

#include <chrono>
#include <vector>

namespace kvcompress {
namespace runtime {

class Timeline {
 public:
  explicit Timeline(at::Device device) : cuda_(device.is_cuda()) {
    if (cuda_ && !built_with_cuda()) throw Error("Timeline: this build of kvcompress::runtime has no CUDA support");
  }

  /// Records a mark after the work queued so far; returns its index.
  size_t mark() {
    if (cuda_) return events_.record();
    host_.push_back(std::chrono::steady_clock::now());
    return host_.size() - 1;
  }

  size_t size() const { return cuda_ ? events_.size() : host_.size(); }

  /// Seconds from mark `from` to mark `to`; waits for mark `to` to be reached.
  double seconds(size_t from, size_t to) const {
    if (from >= size() || to >= size()) throw Error("Timeline: no such mark");
    if (cuda_) return events_.seconds(from, to);
    return std::chrono::duration<double>(host_[to] - host_[from]).count();
  }

 private:
  bool cuda_;
  std::vector<std::chrono::steady_clock::time_point> host_;
  CudaEvents events_;
};

}  // namespace runtime
}  // namespace kvcompress
