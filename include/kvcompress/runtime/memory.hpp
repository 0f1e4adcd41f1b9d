#pragma once
// Peak memory of one run or window: the CUDA caching allocator's peak on CUDA, the process's
// peak resident set on the CPU (reset through /proc/self/clear_refs).
#include <kvcompress/runtime/device.hpp>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdint>
#include <fstream>
#include <string>

namespace kvcompress {
namespace runtime {

/// Gives the memory the C allocator holds free back to the system (glibc; nothing elsewhere):
/// before a peak is measured, or before another process should have the room.
inline void release_free_host_memory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

class PeakMemory {
 public:
  explicit PeakMemory(at::Device device) : device_(device) {}

  /// Starts a new measurement window. On the CPU, memory that glibc's allocator holds free is
  /// first given back to the system, so that the peak counts what this window uses, not what
  /// earlier ones left cached (a process that keeps freed memory, as kvbench does, would
  /// otherwise report its largest earlier run as every later run's peak).
  void reset() {
    if (device_.is_cuda()) {
      cuda_reset_peak(index());
      return;
    }
    release_free_host_memory();
    std::ofstream("/proc/self/clear_refs") << "5";  // resets VmHWM to the current RSS
  }

  /// Bytes held now: the allocator's live tensors on CUDA, -1 on the CPU (a resident set
  /// mixes in what the CPU allocator caches).
  int64_t current_bytes() const { return device_.is_cuda() ? cuda_allocated_bytes(index()) : -1; }

  /// Peak bytes since reset(); -1 when unknown.
  int64_t peak_bytes() const {
    if (device_.is_cuda()) return cuda_peak_allocated_bytes(index());
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
  int index() const { return device_.index() < 0 ? 0 : device_.index(); }
  at::Device device_;
};

}  // namespace runtime
}  // namespace kvcompress
