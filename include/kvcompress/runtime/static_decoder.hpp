#pragma once
// Decoding with a fixed-capacity cache (kvcompress/cache.hpp) through the model's `step`
// method, optionally replaying the one-token step from a CUDA graph. Shapes are static, so a
// step is one graph launch; compression runs between launches and compacts the buffers in place.
#include <kvcompress/cache.hpp>
#include <kvcompress/runtime/model.hpp>

#ifdef KVC_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace kvcompress {
namespace runtime {

/// Largest length every layer reaches when `total` tokens arrive (first `first_chunk` at once,
/// then one by one) and `compressor` runs on `schedule`. Selections depend only on lengths,
/// so this is exact; it sizes the buffers of a StaticCache.
inline std::vector<int64_t> peak_lengths(const Compressor* compressor, int64_t num_layers, int64_t total,
                                         int64_t first_chunk, const Schedule& schedule) {
  std::vector<int64_t> len(static_cast<size_t>(num_layers), 0), peak(static_cast<size_t>(num_layers), 0);
  const at::Tensor probe = at::zeros({1, 1, total, 1});  // values do not change selected counts
  int64_t since = 0;
  for (int64_t done = 0; done < total;) {
    const int64_t t = done == 0 ? std::min(first_chunk, total) : 1;
    done += t;
    since += t;
    for (auto& l : len) l += t;
    for (size_t i = 0; i < len.size(); ++i) peak[i] = std::max(peak[i], len[i]);
    if (!compressor || (schedule.kind == Schedule::chunked && since < schedule.slack)) continue;
    since = 0;
    for (int64_t i = 0; i < num_layers; ++i) {
      auto s = compressor->select(LayerView{probe.narrow(2, 0, len[static_cast<size_t>(i)]), i, num_layers});
      if (s) len[static_cast<size_t>(i)] = s->kept();
    }
  }
  return peak;
}

class StaticDecoder {
 public:
  /// Buffers of `capacity[l]` slots per layer, for `batch` rows. `cuda_graph` captures the
  /// one-token step on first use (CUDA only).
  StaticDecoder(ContractModel& model, int64_t batch, std::vector<int64_t> capacity, bool cuda_graph)
      : model_(model),
        cache_(model.info().num_layers, batch, model.info().num_heads, model.info().head_dim, std::move(capacity),
               at::TensorOptions().dtype(model.dtype()).device(model.device())),
        batch_(batch),
        use_graph_(cuda_graph) {
    if (!model.has_step())
      throw Error("the model has no `step` method (fixed-capacity caches, CUDA graphs); re-export it with "
                  "examples/python/export_pythia.py or export_small_model.py");
    if (cuda_graph && !model.device().is_cuda()) throw Error("--cuda-graph needs --device cuda");
#ifndef KVC_WITH_CUDA
    if (cuda_graph) throw Error("--cuda-graph: this build of kvcompress has no CUDA support");
#endif
    const auto long_opts = at::TensorOptions().dtype(at::kLong).device(model.device());
    ids_ = at::zeros({batch, 1}, long_opts);
    positions_ = at::zeros({batch, 1}, long_opts);
    lengths_ = at::zeros({model.info().num_layers}, long_opts);
    for (int64_t l = 0; l < model.info().num_layers; ++l) {
      key_list_.push_back(cache_.key_buffer(l));
      value_list_.push_back(cache_.value_buffer(l));
    }
  }

  StaticCache& cache() { return cache_; }

  /// Feeds a prompt ([batch, P] int64) at positions first_position.. in steps of `chunk`
  /// tokens (0 = all at once) and returns the logits of the last step. Chunks bound the
  /// prefill's transient memory (float32 logits of every fed position, attention scores) at
  /// the cost of more, smaller steps; the cache ends up the same.
  at::Tensor prefill(const at::Tensor& ids, int64_t first_position, int64_t chunk) {
    if (chunk < 0) throw Error("prefill: chunk must be >= 0, got " + std::to_string(chunk));
    const int64_t p = ids.size(1);
    if (chunk == 0 || chunk >= p) return step(ids, first_position);
    at::Tensor logits;
    for (int64_t s = 0; s < p; s += chunk) {
      const int64_t t = std::min(chunk, p - s);
      logits = step(ids.narrow(1, s, t).contiguous(), first_position + s);
    }
    return logits;
  }

  /// Captures the CUDA graph now (when enabled), so that the first timed step does not pay
  /// for it. Needs one free slot in every layer; writes nothing the next step would not.
  void prepare() {
    if (!use_graph_) return;
    upload_lengths();
    replay();
  }

  /// Feeds T tokens ([batch, T] int64) at positions first_position.. and returns float32 logits
  /// [batch, T, vocab]. T == 1 replays the CUDA graph when enabled. The logits of a graphed step
  /// live in the graph's memory: read them before the next step.
  at::Tensor step(const at::Tensor& ids, int64_t first_position) {
    const int64_t t = ids.size(1);
    cache_.require_room(t);  // before the model writes past the valid slots
    upload_lengths();
    at::Tensor logits;
    if (t == 1) {
      ids_.copy_(ids);
      positions_.fill_(first_position);
      logits = use_graph_ ? replay() : run(ids_, positions_);
    } else {
      const at::Tensor pos = at::arange(first_position, first_position + t, ids_.options()).expand({batch_, t});
      logits = run(ids, pos);
    }
    cache_.commit_step(t, first_position);
    return logits;
  }

 private:
  // Valid lengths to the device. On CUDA from pinned memory without blocking: the caching host
  // allocator keeps each staging buffer alive until its copy has run, so the host never waits.
  void upload_lengths() {
    at::Tensor host = at::tensor(cache_.lengths(), at::kLong);
    if (lengths_.is_cuda()) host = host.pin_memory();
    lengths_.copy_(host, /*non_blocking=*/true);
  }

  at::Tensor run(const at::Tensor& ids, const at::Tensor& positions) {
    return model_.step(ids, positions, key_list_, value_list_, lengths_);
  }

  at::Tensor replay() {
#ifdef KVC_WITH_CUDA
    if (!graph_) {
      // Warm up on a side stream, then capture; the warm-up writes only at the slots this step
      // writes anyway.
      c10::cuda::getCurrentCUDAStream().synchronize();  // inputs copied on the main stream
      auto stream = c10::cuda::getStreamFromPool();
      c10::cuda::CUDAStreamGuard guard(stream);
      for (int i = 0; i < 3; ++i) run(ids_, positions_);
      graph_ = std::make_unique<at::cuda::CUDAGraph>();
      graph_->capture_begin();
      graph_logits_ = run(ids_, positions_);
      graph_->capture_end();
      stream.synchronize();
    }
    graph_->replay();
    return graph_logits_;
#else
    return run(ids_, positions_);
#endif
  }

  ContractModel& model_;
  StaticCache cache_;
  int64_t batch_;
  bool use_graph_;
  at::Tensor ids_, positions_, lengths_;
  c10::List<at::Tensor> key_list_, value_list_;
#ifdef KVC_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
  at::Tensor graph_logits_;
#endif
};

}  // namespace runtime
}  // namespace kvcompress
