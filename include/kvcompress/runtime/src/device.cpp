// The CUDA-dependent part of kvcompress::runtime (device.hpp), compiled once for the library:
// with KVC_RUNTIME_CUDA (set by CMake when LibTorch has CUDA) or as stubs that say so.
#include <kvcompress/runtime/device.hpp>

#ifdef KVC_RUNTIME_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <map>
#include <mutex>
#include <vector>

namespace kvcompress {
namespace runtime {

namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw Error(std::string(what) + ": this build of kvcompress::runtime has no CUDA support "
              "(it was built against a LibTorch without CUDA)");
}
}  // namespace

#ifdef KVC_RUNTIME_CUDA

bool built_with_cuda() { return true; }

struct CudaGraph::Impl {
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  at::Tensor output;
};

namespace {
// One side stream per device for every capture of the process. cuBLAS keeps a workspace (32 MiB
// on an H200) for each stream it has run on, for the life of the process: capturing each graph
// on the next stream of LibTorch's pool left another 32 MiB allocated per decoder (measured on an
// H200, up to the pool's 32 streams).
c10::cuda::CUDAStream capture_stream() {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  const c10::DeviceIndex device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it == streams.end()) it = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  return it->second;
}
}  // namespace

at::Tensor CudaGraph::capture(const std::function<at::Tensor()>& fn, int warmup) {
  // Inputs were written on the current stream; warm-up and capture run on a side stream.
  c10::cuda::getCurrentCUDAStream().synchronize();
  auto stream = capture_stream();
  {
    c10::cuda::CUDAStreamGuard guard(stream);
    for (int i = 0; i < warmup; ++i) fn();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    graph->capture_begin();
    at::Tensor output;
    try {
      output = fn();
    } catch (...) {
      // An error mid-capture (out of memory, say) must end the capture: a stream left capturing
      // fails every later call on it. The half-recorded graph is dropped; the error goes on.
      try {
        graph->capture_end();
      } catch (...) {
      }
      throw;
    }
    graph->capture_end();
    impl_->graph = std::move(graph);
    impl_->output = output;
  }
  stream.synchronize();
  return impl_->output;
}

void CudaGraph::replay() {
  if (!impl_->graph) throw Error("CudaGraph::replay: nothing captured");
  impl_->graph->replay();
}

struct CudaEvents::Impl {
  std::vector<std::unique_ptr<at::cuda::CUDAEvent>> events;
};

size_t CudaEvents::record() {
  impl_->events.push_back(std::make_unique<at::cuda::CUDAEvent>(cudaEventDefault));  // timing on
  impl_->events.back()->record();
  return impl_->events.size() - 1;
}

double CudaEvents::seconds(size_t from, size_t to) const {
  if (from >= size() || to >= size()) throw Error("CudaEvents: no such mark");
  impl_->events[to]->synchronize();
  return static_cast<double>(impl_->events[from]->elapsed_time(*impl_->events[to])) * 1e-3;
}

size_t CudaEvents::size() const { return impl_->events.size(); }

int64_t cuda_peak_allocated_bytes(int device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  // Index 0 is StatType::AGGREGATE (its namespace moved between LibTorch 1.13 and 2.x).
  return stats.allocated_bytes[0].peak;
}

void cuda_reset_peak(int device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }

int64_t cuda_allocated_bytes(int device) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes[0].current;
}

int64_t cuda_total_bytes(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  size_t free = 0, total = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return static_cast<int64_t>(total);
}

void cuda_limit_bytes(int device, int64_t bytes) {
  const int64_t total = cuda_total_bytes(device);
  if (bytes <= 0 || bytes > total)
    throw Error("a memory limit of " + std::to_string(bytes) + " bytes is outside the device's " +
                std::to_string(total) + " bytes");
  c10::cuda::CUDACachingAllocator::setMemoryFraction(static_cast<double>(bytes) / static_cast<double>(total), device);
}

void cuda_release_cached() { c10::cuda::CUDACachingAllocator::emptyCache(); }

#else

bool built_with_cuda() { return false; }

struct CudaGraph::Impl {};
at::Tensor CudaGraph::capture(const std::function<at::Tensor()>&, int) { no_cuda("CUDA graphs"); }
void CudaGraph::replay() { no_cuda("CUDA graphs"); }

struct CudaEvents::Impl {};
size_t CudaEvents::record() { no_cuda("CUDA events"); }
double CudaEvents::seconds(size_t, size_t) const { no_cuda("CUDA events"); }
size_t CudaEvents::size() const { return 0; }

int64_t cuda_peak_allocated_bytes(int) { return -1; }
void cuda_reset_peak(int) {}
int64_t cuda_allocated_bytes(int) { return -1; }
int64_t cuda_total_bytes(int) { return -1; }
void cuda_limit_bytes(int, int64_t) { no_cuda("a CUDA memory limit"); }
void cuda_release_cached() {}

#endif

CudaGraph::CudaGraph() : impl_(std::make_unique<Impl>()) {}
CudaGraph::~CudaGraph() = default;
CudaGraph::CudaGraph(CudaGraph&&) noexcept = default;
CudaGraph& CudaGraph::operator=(CudaGraph&&) noexcept = default;
bool CudaGraph::captured() const {
#ifdef KVC_RUNTIME_CUDA
  return impl_ && impl_->graph != nullptr;
#else
  return false;
#endif
}

CudaEvents::CudaEvents() : impl_(std::make_unique<Impl>()) {}
CudaEvents::~CudaEvents() = default;
CudaEvents::CudaEvents(CudaEvents&&) noexcept = default;
CudaEvents& CudaEvents::operator=(CudaEvents&&) noexcept = default;

}  // namespace runtime
}  // namespace kvcompress
