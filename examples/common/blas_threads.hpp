#pragma once
// OpenBLAS keeps a thread pool of its own, which at::set_num_threads does not size: LibTorch's
// matrix products run there, and its spare threads spin for work. The tools' --threads N means
// N threads for both.
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>

namespace kvtools {

/// LibTorch's OpenMP threads (libgomp) spin for a while after each parallel region, as
/// OpenBLAS's threads do: with more than one thread in each pool the two spun on the same cores.
/// Measured here (2 cores, kvbench --throughput on the bundled model, decode at batch 2): TPOT
/// 33-52 ms with --threads 2, 3.7 ms with OMP_WAIT_POLICY=PASSIVE. libgomp reads the policy when
/// it loads, before main, so a tool about to run `threads` > 1 starts itself again with it set
/// -- unless the user set it (or GOMP_SPINCOUNT). Returns only when it did not restart.
inline void restart_with_passive_openmp(int threads, char** argv) {
  if (threads <= 1 || std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
  if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return;
  execv("/proc/self/exe", argv);
  unsetenv("OMP_WAIT_POLICY");  // could not start again: go on as before
}

/// A scope that caps OpenBLAS's pool at n threads (n > 0) and restores it; nothing where
/// LibTorch links another BLAS.
class BlasThreads {
 public:
  explicit BlasThreads(int n) {
    get_ = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    set_ = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    if (n <= 0 || !get_ || !set_) return;
    previous_ = get_();
    set_(n);
  }
  ~BlasThreads() {
    if (previous_ > 0) set_(previous_);
  }
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;

 private:
  int (*get_)() = nullptr;
  void (*set_)(int) = nullptr;
  int previous_ = 0;
};

}  // namespace kvtools
