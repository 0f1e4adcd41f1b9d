#pragma once
// One-pass evaluation: several runs (the full cache, each method and budget) as the rows of one
// batch. Every row is fed the same text; each keeps its own fixed-capacity cache -- its own
// lengths per layer, positions, policy and schedule -- inside buffers its group of rows shares,
// so that a few model calls per token serve them all (contract version 5's per-row lengths). A
// decode of a small model is bound by per-call overhead, not arithmetic: one call for R rows
// costs little more than one call for one row. Rows of very different capacities go to
// different calls (a short row would otherwise attend over the longest row's slots), layers
// every row of a call keeps whole run once for all of them, and host workers share the calls
// and the rows' compressions.
//
// Each row is a StaticDecoder over its slice of the shared buffers, so compression, positions
// and scoring are the separate pass's code; only the model call is shared. Rows differ from a
// separate pass by float rounding of the batched matrix products (and, for attention-aware
// policies, by scores computed from the queries after the step rather than inside it).
#include <kvcompress/runtime/evaluate.hpp>

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace kvcompress {
namespace runtime {

namespace detail {

/// A fixed set of threads that run one task together: run(fn) calls fn(w) for every worker w
/// in [0, size()) at once -- the caller is worker 0 -- and returns when all are done, rethrowing
/// the first exception. Each worker enters the caller's inference mode.
class Workers {
 public:
  explicit Workers(int64_t n) {
    for (int64_t w = 1; w < n; ++w) threads_.emplace_back([this, w] { loop(w); });
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  Workers(const Workers&) = delete;
  Workers& operator=(const Workers&) = delete;

  int64_t size() const { return static_cast<int64_t>(threads_.size()) + 1; }

  void run(const std::function<void(int64_t)>& fn) {
    if (threads_.empty()) return fn(0);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &fn;
      inference_ = c10::InferenceMode::is_enabled();
      pending_ = threads_.size();
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr mine;
    try {
      fn(0);
    } catch (...) {
      mine = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void loop(int64_t w) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* task = nullptr;
      bool inference = false;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        task = task_;
        inference = inference_;
      }
      std::exception_ptr error;
      try {
        c10::InferenceMode guard(inference);
        (*task)(w);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && !error_) error_ = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* task_ = nullptr;
  bool inference_ = false, stop_ = false;
  size_t pending_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

}  // namespace detail

class OnePass {
 public:
  /// One row per entry of `runs` (each of batch 1: a row is one sequence), with buffers sized
  /// for `total` tokens fed one at a time. `cuda_graph` replays each group's step from a graph.
  /// `workers` host threads share the model calls and the compressions of a step (on a CPU,
  /// where each call and each compression runs on the thread that issues it).
  OnePass(ContractModel& model, const std::vector<DecoderOptions>& runs, int64_t total, bool cuda_graph = false,
          int64_t workers = 1)
      : model_(model), use_graph_(cuda_graph) {
    if (workers < 1 || workers > 256) throw Error("one pass: workers must be in [1, 256], got " + std::to_string(workers));
    const ModelInfo& info = model.info();
    if (runs.empty()) throw Error("one pass: no runs to evaluate");
    if (total < 1) throw Error("one pass: total tokens must be >= 1, got " + std::to_string(total));
    if (!model.has_step() || !info.per_row_lengths())
      throw Error("one pass: model '" + info.name + "' (contract version " + std::to_string(info.contract_version) +
                  ") cannot run caches of different lengths as the rows of one batch: that needs contract version "
                  "5's per-row lengths in `step`. Upgrade the file with examples/python/upgrade_contract.py, or "
                  "evaluate the methods one at a time (kvbench --no-one-pass)");
    if (cuda_graph && !model.device().is_cuda()) throw Error("CUDA graphs need the model on a CUDA device");
    if (cuda_graph && !built_with_cuda()) throw Error("CUDA graphs: this build of kvcompress::runtime has no CUDA support");
    if (cuda_graph && workers > 1)
      throw Error("one pass: CUDA graphs need one worker (graphs are captured on one stream), got " +
                  std::to_string(workers));
    std::vector<Need> need;
    for (size_t r = 0; r < runs.size(); ++r) {
      if (runs[r].batch != 1)
        throw Error("one pass: run " + std::to_string(r) + " has batch " + std::to_string(runs[r].batch) +
                    "; each row is one sequence (batch 1)");
      need.push_back(need_of(runs[r], info.num_layers, total));
    }
    rows_.resize(runs.size());
    std::vector<double> cost;
    for (auto& members : partition(need, workers, cost)) add_group(runs, need, members);
    assign_work(cost, workers);
    std::vector<int64_t> order;  // row of each output in group order
    for (const auto& g : groups_) order.insert(order.end(), g.rows.begin(), g.rows.end());
    std::vector<int64_t> inverse(order.size());
    for (size_t i = 0; i < order.size(); ++i) inverse[static_cast<size_t>(order[i])] = static_cast<int64_t>(i);
    in_row_order_ = at::tensor(inverse, at::kLong).to(model.device());
  }

  int64_t rows() const { return static_cast<int64_t>(rows_.size()); }
  /// Row r as a decoder to look at (view, lengths, original positions, options).
  const Decoder& row(int64_t r) const { return *rows_.at(static_cast<size_t>(r)); }
  /// Tokens fed since the last reset (every row has been fed the same).
  int64_t fed() const { return rows_.front()->fed(); }
  ContractModel& model() const { return model_; }
  /// The model calls of a step: each serves a group of rows (indices), whose first `shared`
  /// layers run once for all of them.
  struct GroupInfo {
    std::vector<int64_t> rows;
    int64_t shared = 0;
  };
  std::vector<GroupInfo> groups() const {
    std::vector<GroupInfo> out;
    for (const auto& g : groups_) out.push_back({g.rows, g.shared});
    return out;
  }

  /// Feeds `token` to every row; returns float32 logits [rows, vocab]. Graph-replayed logits
  /// live in the graph's memory: read them before the next step.
  at::Tensor step(int64_t token) {
    std::vector<at::Tensor> logits(groups_.size());
    workers_->run([&](int64_t w) {
      for (size_t i : calls_of_[static_cast<size_t>(w)]) logits[i] = step_group(groups_[i], token);
    });
    if (logits.size() == 1 && groups_.front().in_order) return logits.front();
    return at::cat(logits, 0).index_select(0, in_row_order_);
  }

  /// Compresses every row whose schedule says so; `compressed[r]` says whether row r did. Rows
  /// are independent: each worker takes the next row left until none is (policies differ in
  /// cost by an order of magnitude, so a fixed share would leave one worker waiting).
  void maybe_compress(std::vector<char>& compressed) {
    compressed.assign(rows_.size(), 0);
    std::atomic<size_t> next{0};
    workers_->run([&](int64_t) {
      for (size_t i = next++; i < compressing_.size(); i = next++) {
        const int64_t r = compressing_[i];
        compressed[static_cast<size_t>(r)] = row_at(r).maybe_compress() ? 1 : 0;
      }
    });
  }

  int64_t workers() const { return workers_->size(); }

  /// Empties every row for a new sequence (also what to do after a step or compression threw).
  void reset() {
    for (auto& r : rows_) r->reset();
  }

  /// Captures the CUDA graphs now (when enabled), so that the first timed step does not pay
  /// for them. Writes nothing the next step would not.
  void prepare() {
    if (!use_graph_) return;
    for (auto& g : groups_) {
      if (g.graph.captured()) continue;
      for (int64_t r : g.rows) row_at(r).before_batch_step();
      upload_step_inputs(g, 0);
      g.graph_logits = g.graph.capture([this, &g] { return call(g); });
    }
  }

 private:
  // What a row needs of the shared buffers.
  struct Need {
    std::vector<int64_t> capacity;  // per layer
    int64_t whole_prefix = 0;       // leading layers it never compresses
    int64_t ring = 0;               // queries kept (see StaticDecoder's row constructor)
    bool hides = false;
  };

  static Need need_of(const DecoderOptions& run, int64_t layers, int64_t total) {
    Need n;
    n.capacity = peak_lengths(run.compressor, layers, total, 1, run.schedule);
    const int64_t largest = *std::max_element(n.capacity.begin(), n.capacity.end());
    if (!run.compressor) {
      n.whole_prefix = layers;
      return n;
    }
    const std::vector<int64_t> skip = run.compressor->skip_layers();
    while (n.whole_prefix < layers && std::find(skip.begin(), skip.end(), n.whole_prefix) != skip.end()) ++n.whole_prefix;
    const Needs needs = run.compressor->needs();
    // Rows score their attention from the ring after the step: at least the last query.
    n.ring = std::max(StaticDecoder::ring_size(needs, run.schedule, largest), needs.attention ? int64_t{1} : 0);
    n.hides = needs.hides;
    return n;
  }

  // Rows into groups, one model call each. A step streams the weights once per call and every
  // row's keys and values over its group's capacity (a shared prefix layer once per group), so
  // rows of very different capacities (the full cache beside small budgets) are better in
  // separate calls, and rows alike in one. Rows sorted by capacity, split where the estimate
  // -- a call as `call_slots` slot-layers (the weights' bytes over one slot-layer's K/V bytes),
  // plus the slot-layers each group reads -- is least (dynamic programming over the splits).
  // With several workers, the costliest group is halved (into rows of lower and higher
  // capacity) while it alone would exceed a worker's share, so that the calls can run side by
  // side. `cost` receives each group's estimate.
  std::vector<std::vector<int64_t>> partition(const std::vector<Need>& need, int64_t workers,
                                              std::vector<double>& cost_out) const {
    const ModelInfo& info = model_.info();
    const int64_t n = static_cast<int64_t>(need.size()), layers = info.num_layers;
    std::vector<int64_t> sorted(static_cast<size_t>(n));
    std::iota(sorted.begin(), sorted.end(), int64_t{0});
    auto size_of = [&](int64_t r) {
      const auto& c = need[static_cast<size_t>(r)].capacity;
      return std::accumulate(c.begin(), c.end(), int64_t{0});
    };
    std::stable_sort(sorted.begin(), sorted.end(), [&](int64_t a, int64_t b) { return size_of(a) < size_of(b); });
    const double slot_bytes = 2.0 * static_cast<double>(info.num_heads * info.head_dim) *
                              static_cast<double>(c10::elementSize(model_.dtype()));
    const double call_slots = static_cast<double>(model_.parameter_bytes()) / slot_bytes;
    auto cost = [&](int64_t first, int64_t last) {  // sorted[first..last] as one group
      int64_t shared = layers;
      std::vector<int64_t> cap(static_cast<size_t>(layers), 0);
      for (int64_t i = first; i <= last; ++i) {
        const Need& x = need[static_cast<size_t>(sorted[static_cast<size_t>(i)])];
        shared = std::min(shared, x.whole_prefix);
        for (int64_t l = 0; l < layers; ++l) cap[static_cast<size_t>(l)] = std::max(cap[static_cast<size_t>(l)], x.capacity[static_cast<size_t>(l)]);
      }
      double slots = 0;
      for (int64_t l = 0; l < layers; ++l)
        slots += static_cast<double>(cap[static_cast<size_t>(l)]) * static_cast<double>(l < shared ? 1 : last - first + 1);
      return call_slots + slots;
    };
    std::vector<double> best(static_cast<size_t>(n + 1), 0.0);
    std::vector<int64_t> split(static_cast<size_t>(n + 1), 0);
    for (int64_t j = 1; j <= n; ++j) {
      best[static_cast<size_t>(j)] = std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < j; ++i) {
        const double c = best[static_cast<size_t>(i)] + cost(i, j - 1);
        if (c < best[static_cast<size_t>(j)]) {
          best[static_cast<size_t>(j)] = c;
          split[static_cast<size_t>(j)] = i;
        }
      }
    }
    std::vector<std::pair<int64_t, int64_t>> ranges;  // [first, last] in sorted order
    for (int64_t j = n; j > 0; j = split[static_cast<size_t>(j)])
      ranges.insert(ranges.begin(), {split[static_cast<size_t>(j)], j - 1});
    for (int64_t round = 0; workers > 1 && round < 4 * workers; ++round) {
      double total = 0, top = -1;
      size_t costliest = 0;
      for (size_t i = 0; i < ranges.size(); ++i) {
        const double c = cost(ranges[i].first, ranges[i].second);
        total += c;
        if (ranges[i].second > ranges[i].first && c > top) {
          top = c;
          costliest = i;
        }
      }
      if (top <= total / static_cast<double>(workers)) break;
      const auto [first, last] = ranges[costliest];
      const int64_t mid = first + (last - first + 1) / 2;
      ranges[costliest] = {first, mid - 1};
      ranges.insert(ranges.begin() + static_cast<std::ptrdiff_t>(costliest) + 1, {mid, last});
    }
    std::vector<std::vector<int64_t>> groups;
    cost_out.clear();
    for (const auto& [first, last] : ranges) {
      std::vector<int64_t> members(sorted.begin() + first, sorted.begin() + last + 1);
      std::sort(members.begin(), members.end());
      groups.push_back(members);
      cost_out.push_back(cost(first, last));
    }
    return groups;
  }

  // One model call's rows: buffers [rows, H, C_l, D] per layer, except the first `shared`
  // layers, whose buffers hold one row that every row of the group reads and writes (the same
  // tokens, never compressed: the same keys and values).
  struct Group {
    std::vector<int64_t> rows;
    int64_t shared = 0, ring = 0;
    bool scored = false, in_order = false;
    std::vector<at::Tensor> keys, values, bias, queries;
    c10::List<at::Tensor> key_list, value_list, bias_list, query_list;
    c10::List<at::Tensor> narrow_keys, narrow_values, narrow_bias;  // this step's cuts (narrowed())
    at::Tensor ids, positions, lengths, query_slots, graph_logits;
    CudaGraph graph;
  };

  void add_group(const std::vector<DecoderOptions>& runs, const std::vector<Need>& need, const std::vector<int64_t>& members) {
    const ModelInfo& info = model_.info();
    const int64_t layers = info.num_layers, rows = static_cast<int64_t>(members.size());
    groups_.emplace_back();
    Group& g = groups_.back();
    g.rows = members;
    g.shared = rows > 1 ? layers : 0;  // one row: nothing to share
    std::vector<int64_t> capacity(static_cast<size_t>(layers), 1);
    bool hides = false;
    for (int64_t r : members) {
      const Need& x = need[static_cast<size_t>(r)];
      g.shared = std::min(g.shared, x.whole_prefix);
      g.ring = std::max(g.ring, x.ring);
      hides = hides || x.hides;
      for (size_t l = 0; l < capacity.size(); ++l) capacity[l] = std::max(capacity[l], x.capacity[l]);
    }
    const auto opts = at::TensorOptions().dtype(model_.dtype()).device(model_.device());
    try {
      for (int64_t l = 0; l < layers; ++l) {
        const int64_t b = l < g.shared ? 1 : rows, c = capacity[static_cast<size_t>(l)];
        g.keys.push_back(at::zeros({b, info.num_heads, c, info.head_dim}, opts));
        g.values.push_back(at::zeros({b, info.num_heads, c, info.head_dim}, opts));
        if (hides) g.bias.push_back(at::zeros({b, info.num_heads, c}, opts));
        if (g.ring > 0) g.queries.push_back(at::zeros({b, info.num_heads, g.ring, info.head_dim}, opts));
      }
    } catch (const std::exception& e) {
      throw Error("one pass: cannot allocate the buffers of " + std::to_string(rows) + " rows of capacity " +
                  params::format_int_list(capacity) + " on " + model_.device().str() + ": " + first_line(e));
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = members[static_cast<size_t>(i)];
      const DecoderOptions& run = runs[static_cast<size_t>(r)];
      const bool row_hides = run.compressor && run.compressor->needs().hides;
      StaticCache::Storage storage;
      std::vector<at::Tensor> ring;
      for (int64_t l = 0; l < layers; ++l) {
        const size_t li = static_cast<size_t>(l);
        auto mine = [&](const at::Tensor& t) { return l < g.shared ? t : t.narrow(0, i, 1); };
        storage.keys.push_back(mine(g.keys[li]));
        storage.values.push_back(mine(g.values[li]));
        if (row_hides) storage.slot_bias.push_back(mine(g.bias[li]));
        if (g.ring > 0) ring.push_back(mine(g.queries[li]));
      }
      rows_[static_cast<size_t>(r)].reset(new StaticDecoder(model_, run, StaticCache(std::move(storage)), false, &ring));
    }
    for (size_t l = 0; l < g.keys.size(); ++l) {
      g.key_list.push_back(g.keys[l]);
      g.value_list.push_back(g.values[l]);
      if (hides) g.bias_list.push_back(g.bias[l]);
      if (g.ring > 0) g.query_list.push_back(g.queries[l]);
    }
    g.scored = hides || g.ring > 0;
    g.in_order = true;
    for (int64_t i = 0; i < rows; ++i) g.in_order = g.in_order && members[static_cast<size_t>(i)] == i;
    g.in_order = g.in_order && rows == static_cast<int64_t>(runs.size());
    const auto long_opts = opts.dtype(at::kLong);
    g.ids = at::zeros({1, 1}, long_opts);  // one row of tokens: every row feeds it (contract version 5)
    g.positions = at::zeros({layers, rows, 1}, long_opts);
    g.lengths = at::zeros({layers, rows}, long_opts);
    g.query_slots = at::zeros({g.ring > 0 ? 1 : 0}, long_opts);
  }

  StaticDecoder& row_at(int64_t r) { return *rows_[static_cast<size_t>(r)]; }

  // Calls to workers, costliest first to the least loaded; the rows that compress, in the order
  // workers take them.
  void assign_work(const std::vector<double>& cost, int64_t workers) {
    workers = std::min<int64_t>(workers, rows());
    workers_ = std::make_unique<detail::Workers>(workers);
    calls_of_.assign(static_cast<size_t>(workers), {});
    std::vector<size_t> by_cost(groups_.size());
    std::iota(by_cost.begin(), by_cost.end(), size_t{0});
    std::stable_sort(by_cost.begin(), by_cost.end(), [&](size_t a, size_t b) { return cost[a] > cost[b]; });
    std::vector<double> load(static_cast<size_t>(workers), 0.0);
    for (size_t g : by_cost) {
      const size_t w = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
      calls_of_[w].push_back(g);
      load[w] += cost[g];
    }
    // Largest caches first: the costliest compressions start early, the cheap ones fill in.
    for (int64_t r = 0; r < rows(); ++r)
      if (rows_[static_cast<size_t>(r)]->options().compressor) compressing_.push_back(r);
    auto held = [&](int64_t r) {
      const auto& c = rows_[static_cast<size_t>(r)]->cache_;
      int64_t n = 0;
      for (int64_t l = 0; l < c.num_layers(); ++l) n += c.capacity(l);
      return n;
    };
    std::stable_sort(compressing_.begin(), compressing_.end(), [&](int64_t a, int64_t b) { return held(a) > held(b); });
  }

  // One group's model call: the rows' bookkeeping around it.
  at::Tensor step_group(Group& g, int64_t token) {
    for (int64_t r : g.rows) row_at(r).before_batch_step();
    upload_step_inputs(g, token);
    at::Tensor logits;
    if (use_graph_) {
      if (!g.graph.captured()) g.graph_logits = g.graph.capture([this, &g] { return call(g); });
      g.graph.replay();
      logits = g.graph_logits.select(1, 0);
    } else {
      logits = call(g).select(1, 0);
    }
    for (int64_t r : g.rows) row_at(r).after_batch_step();
    return logits;
  }


  at::Tensor call(Group& g) {
    const bool narrow = !use_graph_;
    const c10::List<at::Tensor>& keys = narrow ? narrowed(g, g.keys, g.narrow_keys) : g.key_list;
    const c10::List<at::Tensor>& values = narrow ? narrowed(g, g.values, g.narrow_values) : g.value_list;
    if (!g.scored) return model_.step(g.ids, g.positions, keys, values, g.lengths);
    // Attention is never accumulated inside the batch's step (rows may decay it differently):
    // rows score it from the queries the step writes into their ring.
    // The masks are cut exactly as the buffers are: a graph reads them whole.
    const c10::List<at::Tensor>& bias = narrow && !g.bias.empty() ? narrowed(g, g.bias, g.narrow_bias) : g.bias_list;
    return model_.step_scored(g.ids, g.positions, keys, values, g.lengths, c10::List<at::Tensor>(), 1.0, g.query_list,
                              g.query_slots, bias);
  }

  // The buffers cut after the longest row's next slot: the step attends over every slot it is
  // given, and rows early in the text would otherwise cost the whole capacity's memory traffic.
  // A graph needs the whole buffers (its shapes are fixed at capture).
  c10::List<at::Tensor>& narrowed(const Group& g, const std::vector<at::Tensor>& whole, c10::List<at::Tensor>& out) {
    out.clear();
    for (size_t l = 0; l < whole.size(); ++l) {
      int64_t used = 0;
      for (int64_t r : g.rows) used = std::max(used, row_at(r).cache_.length(static_cast<int64_t>(l)) + 1);
      out.push_back(whole[l].narrow(2, 0, std::min(used, whole[l].size(2))));
    }
    return out;
  }

  // The group's rows' lengths and next positions into the buffers its step (or graph) reads.
  void upload_step_inputs(Group& g, int64_t token) {
    const int64_t rows = static_cast<int64_t>(g.rows.size()), layers = static_cast<int64_t>(g.keys.size());
    g.ids.fill_(token);
    at::Tensor lengths = at::empty({layers, rows}, at::kLong), positions = at::empty({layers, rows, 1}, at::kLong);
    auto len = lengths.accessor<int64_t, 2>();
    for (int64_t i = 0; i < rows; ++i) {
      const StaticDecoder& d = row_at(g.rows[static_cast<size_t>(i)]);
      const std::vector<int64_t>& held = d.cache_.lengths();
      for (int64_t l = 0; l < layers; ++l) len[l][i] = held[static_cast<size_t>(l)];
      positions.select(1, i).select(1, 0).copy_(d.next_layer_positions());
    }
    StaticDecoder::copy_from_host(g.lengths, lengths);
    StaticDecoder::copy_from_host(g.positions, positions);
    // The group's own count: another worker may be advancing its rows meanwhile.
    const int64_t fed = row_at(g.rows.front()).fed();
    if (g.ring > 0) StaticDecoder::copy_from_host(g.query_slots, at::full({1}, fed % g.ring, at::kLong));
  }

  ContractModel& model_;
  std::vector<std::unique_ptr<StaticDecoder>> rows_;
  std::vector<Group> groups_;   // all added by the constructor, before any graph captures one by address
  at::Tensor in_row_order_;     // groups' outputs back to row order
  bool use_graph_ = false;
  std::unique_ptr<detail::Workers> workers_;
  std::vector<std::vector<size_t>> calls_of_;  // per worker, the groups it calls
  std::vector<int64_t> compressing_;           // rows with a compressor, costliest first
};

/// evaluate() for every row of `pass` at once: feed token t to all rows, score token t + 1 in
/// each, compress each row on its schedule. Adds row r's figures to `m[r]`. The step time of
/// every row is the batch's (one call serves all of them), and so are the windows' seconds and
/// peak memory; `eo.on_compressed` receives each row's decoder (pass.row(r)).
inline void evaluate_one_pass(OnePass& pass, const std::vector<int64_t>& tokens, std::vector<RunMetrics>& m,
                              const EvalOptions& eo = {}) {
  c10::InferenceMode guard;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const size_t rows = static_cast<size_t>(pass.rows());
  if (m.size() != rows)
    throw Error("evaluate_one_pass: " + std::to_string(m.size()) + " metrics for " + std::to_string(rows) + " rows");
  if (n < 2) throw Error("evaluate_one_pass: a sample needs at least 2 tokens, got " + std::to_string(n));
  if (eo.window < 0) throw Error("evaluate_one_pass: window must be >= 0, got " + std::to_string(eo.window));
  if (eo.window > n)
    throw Error("evaluate_one_pass: window " + std::to_string(eo.window) + " is longer than the sample (" +
                std::to_string(n) + " tokens)");
  pass.reset();
  pass.prepare();
  std::vector<WindowMetrics> win(rows);
  std::vector<char> compressed;
  auto window_start = std::chrono::steady_clock::now();
  auto open_windows = [&](int64_t start) {
    for (size_t r = 0; r < rows; ++r) {
      win[r] = WindowMetrics{};
      win[r].sample = m[r].samples;
      win[r].start = start;
    }
    if (eo.memory) eo.memory->reset();
    window_start = std::chrono::steady_clock::now();
  };
  auto close_windows = [&](int64_t end) {
    const double seconds = detail::seconds_since(window_start);
    const int64_t peak = eo.memory ? eo.memory->peak_bytes() : -1;
    for (size_t r = 0; r < rows; ++r) {
      const Decoder& d = pass.row(static_cast<int64_t>(r));
      win[r].end = end;
      win[r].cache_tokens = detail::first_compressed_layer_tokens(d.lengths(), d.options().compressor, eo.baseline_skip);
      win[r].seconds = seconds;
      win[r].peak_memory_bytes = peak;
      m[r].windows.push_back(win[r]);
    }
  };
  if (eo.window > 0) open_windows(0);
  const auto run_start = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor logits = pass.step(tokens[static_cast<size_t>(t)]);  // [rows, vocab]
    at::Tensor scored;
    if (t + 1 < n) {
      const int64_t next = tokens[static_cast<size_t>(t + 1)];
      const at::Tensor nll = at::logsumexp(logits, 1) - logits.select(1, next);
      scored = at::stack({nll.to(at::kDouble), logits.argmax(1).to(at::kDouble)});  // [2, rows]
    } else {
      scored = logits.sum().to(at::kDouble);  // last step: synchronise all the same
    }
    pass.maybe_compress(compressed);
    for (size_t r = 0; r < rows && eo.on_compressed; ++r)
      if (compressed[r]) eo.on_compressed(t, pass.row(static_cast<int64_t>(r)));
    const at::Tensor host = scored.to(at::kCPU);  // the step's one synchronisation
    if (t + 1 < n) {
      const auto h = host.accessor<double, 2>();
      const int64_t next = tokens[static_cast<size_t>(t + 1)];
      for (size_t r = 0; r < rows; ++r) {
        const double nll = h[0][static_cast<int64_t>(r)];
        const bool hit = static_cast<int64_t>(h[1][static_cast<int64_t>(r)]) == next;
        m[r].nll_sum += nll;
        m[r].hits += hit ? 1 : 0;
        ++m[r].scored;
        m[r].token_nll.push_back(nll);
        win[r].nll_sum += nll;
        win[r].hits += hit ? 1 : 0;
        ++win[r].scored;
      }
    }
    if (eo.window > 0 && ((t + 1) % eo.window == 0 || t + 1 == n)) {
      close_windows(t + 1);
      if (t + 1 < n) open_windows(t + 1);
    }
    if (eo.progress) eo.progress(t + 1, n);
  }
  const double step_s = detail::seconds_since(run_start) / static_cast<double>(n);
  for (size_t r = 0; r < rows; ++r) {
    const Decoder& d = pass.row(static_cast<int64_t>(r));
    RunMetrics& mr = m[r];
    mr.sample_step_s.push_back(step_s);
    mr.tokens += n;
    ++mr.samples;
    const std::vector<int64_t> lengths = d.lengths();
    mr.cache_tokens = detail::first_compressed_layer_tokens(lengths, d.options().compressor, eo.baseline_skip);
    mr.max_layer_tokens = std::max(mr.max_layer_tokens, *std::max_element(lengths.begin(), lengths.end()));
    detail::warn_about_context(mr, d, lengths);
    mr.cache_bytes = detail::cache_bytes(d.view());
  }
}

}  // namespace runtime
}  // namespace kvcompress
