#pragma once
// OpenBLAS keeps a thread pool of its own, which at::set_num_threads does not size: LibTorch's
// matrix products run there, and its spare threads spin for work. The tools' --threads N means
// N threads for both.
#include <dlfcn.h>

namespace kvtools {

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
