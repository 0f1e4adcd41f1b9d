#pragma once
// Peak memory of one run: the CUDA caching allocator's peak on CUDA, the process's peak
// resident set on the CPU (reset per run through /proc/self/clear_refs).
#include <ATen/ATen.h>

#include <cstdint>
#include <fstream>
#include <string>

#ifdef KVC_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace kvcompress {
namespace runtime {

class PeakMemory {
 public:
  explicit PeakMemory(at::Device device) : device_(device) {}

  /// Starts a new measurement window.
  void reset() {
    if (device_.is_cuda()) {
#ifdef KVC_WITH_CUDA
      c10::cuda::CUDACachingAllocator::resetPeakStats(device_.index() < 0 ? 0 : device_.index());
#endif
    } else {
      std::ofstream("/proc/self/clear_refs") << "5";  // resets VmHWM to the current RSS
    }
  }

  /// Peak bytes since reset(); -1 when unknown.
  int64_t peak_bytes() const {
    if (device_.is_cuda()) {
#ifdef KVC_WITH_CUDA
      const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index() < 0 ? 0 : device_.index());
      // Index 0 is StatType::AGGREGATE (its namespace moved between LibTorch 1.13 and 2.x).
      return stats.allocated_bytes[0].peak;
#else
      return -1;
#endif
    }
    std::ifstream status("/proc/self/status");
    std::string key;
    while (status >> key) {
      if (key == "VmHWM:") {
        int64_t kb = 0;
        status >> kb;
        return kb * 1024;
      }
      std::getline(status, key);
    }
    return -1;
  }

 private:
  at::Device device_;
};

}  // namespace runtime
}  // namespace kvcompress
