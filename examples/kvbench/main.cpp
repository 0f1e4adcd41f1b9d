// kvbench: runs a contract TorchScript model (docs/MODEL_CONTRACT.md) token by token over text
// and reports, for the full cache and every requested compression method, perplexity,
// next-token accuracy, TTFT, TPOT, throughput, cache size and peak memory (per window too, for
// texts longer than the model's context); plus a greedy generation measurement. A small tool
// over kvcompress::runtime: cli.hpp (options), inputs.hpp (texts, token files), report.hpp
// (table, JSON, CSV), rounds.hpp (generation rounds in fresh processes). `kvbench --help` lists
// the options.
#include "cli.hpp"
#include "inputs.hpp"
#include "report.hpp"
#include "rounds.hpp"
#include "throughput.hpp"
#include "../common/blas_threads.hpp"

#include <kvcompress/runtime/runtime.hpp>

#include <ATen/Parallel.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdio>
#include <limits>
#include <thread>

namespace kvbench {
namespace {

// glibc gives large freed blocks straight back to the system (mmap'd blocks, and the heap's top
// beyond the trim threshold), so every prefill touched fresh pages that the kernel had to zero.
// Measured on the bundled model's generation (CPU, --threads 1, OpenBLAS at two threads): TTFT
// 113-125 ms with glibc's defaults, 69-74 ms with freed memory kept, as a serving process keeps
// it (and the CUDA caching allocator does on the GPU). Peaks stay per run: PeakMemory::reset()
// gives the cached memory back first.
void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest: blocks up to 32 MiB come from the heap
  mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
#endif
}

// Under the cache rule a version-1 model takes one position for all layers: refuse up front a
// run whose layers would hold different numbers of tokens (the decoder would stop mid-run).
void check_positions_fit_model(const Options& o, const rt::ContractModel& model, const std::vector<Run>& runs,
                               int64_t tokens) {
  if (o.rule() != rt::PositionRule::cache || model.info().per_layer_positions()) return;
  const int64_t layers = model.info().num_layers;
  for (const auto& r : runs) {
    if (!r.compressor) continue;
    std::vector<int64_t> kept;
    for (int64_t l = 0; l < layers; ++l) kept.push_back(kvc::kept_tokens(*r.compressor, l, layers, tokens));
    if (std::adjacent_find(kept.begin(), kept.end(), std::not_equal_to<>()) != kept.end())
      fail(r.label + ": under --positions cache its layers keep different numbers of tokens (" +
           kvc::params::format_int_list(kept) + " at " + std::to_string(tokens) + " tokens), but " + o.model +
           " is a contract version 1 file, which takes one position per token for all layers; " +
           rt::kVersion1CacheRuleRemedy);
  }
}

// Attention-aware methods need contract version 3's scored methods: refuse up front, not after
// the runs before them.
void check_model_scores_for(const rt::ContractModel& model, const std::vector<Run>& runs) {
  for (const auto& r : runs) {
    if (!r.compressor) continue;
    try {
      rt::Decoder::require_scores_from(model, *r.compressor);
    } catch (const kvc::Error& e) {
      fail(r.label + ": " + e.what());
    }
  }
}

int run(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  // A generation round started by another kvbench (rounds.hpp): the same runs, each timed once,
  // no evaluation and no files; a line per run to the descriptor.
  RoundWriter round_out(static_cast<int>(o.generation_round_fd));
  if (round_out.enabled() != !o.generation_round_prompt.empty())
    fail("--generation-round-fd and --generation-round-prompt go together (kvbench passes both to its own rounds)");
  if (round_out.enabled()) {
    stop_with_parent();
    o.eval = false;
    o.one_pass = -1;
    o.repeats = 1;
    o.process_per_repeat = 0;
    o.results = false;
    o.json.clear();
    o.csv.clear();
    o.trace.clear();
    o.save_tokens.clear();
    o.quiet = true;
  }
  keep_freed_memory();
  kvtools::restart_with_passive_openmp(o.threads > 0 ? static_cast<int>(o.threads) : at::get_num_threads(), argv);
  if (o.threads > 0) at::set_num_threads(static_cast<int>(o.threads));
  const kvtools::BlasThreads blas_threads(static_cast<int>(o.threads));  // --threads N: N threads
  torch::jit::setGraphExecutorOptimize(o.jit_optimize == 1 || (o.jit_optimize < 0 && o.cuda_graph));
  at::Device device(at::kCPU);
  if (o.device == "cuda") {
    if (!at::hasCUDA()) fail("--device cuda: no CUDA device is available (or this LibTorch has no CUDA)");
    device = at::Device(at::kCUDA, 0);
  }
  if (o.cuda_graph && !rt::built_with_cuda()) fail("--cuda-graph: this build of kvcompress::runtime has no CUDA support");
  const at::ScalarType dtype = o.dtype == "float16" ? at::kHalf : o.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  std::vector<Run> runs = make_runs(o);  // spec and output errors before the (slow) model load
  if (!o.json.empty()) check_output_path("--json", o.json);
  if (!o.csv.empty()) check_output_path("--csv", o.csv);
  if (!o.save_tokens.empty() && !std::filesystem::is_directory(o.save_tokens))
    fail("--save-tokens " + kvc::params::printable(o.save_tokens) + " is not a directory");
  const std::string out_dir = o.results ? results_dir(o) : "";
  if (o.results) check_results_dir(out_dir);
  Trace trace(o.trace);
  rt::ContractModel model = rt::ContractModel::load(o.model, device, dtype);
  // A round reads no input of the user's again (standard input or a pipe reads only once; a file
  // may have changed): it feeds the ids its parent evaluated.
  std::vector<Sample> samples = round_out.enabled()
                                    ? std::vector<Sample>{{"the generation's prompt", rt::read_token_file(o.generation_round_prompt)}}
                                    : load_samples(o, model);
  const auto& info = model.info();
  // --throughput: every context is the first sample's first tokens; the allocator's cap.
  int64_t memory_limit = o.memory_limit;
  if (o.throughput) {
    const int64_t need = *std::max_element(o.contexts.begin(), o.contexts.end());
    const int64_t have = static_cast<int64_t>(samples.front().tokens.size());
    if (have < need)
      fail("--contexts: " + std::to_string(need) + " tokens of prompt needed, " + samples.front().source + " has " +
           std::to_string(have) + (o.max_tokens > 0 && have == o.max_tokens ? " (cut by --max-tokens; 0 = the whole text)" : "") +
           ": give longer --tokens or --text, or lower --contexts");
    if (device.is_cuda()) {
      if (memory_limit > 0) rt::cuda_limit_bytes(0, memory_limit);
      else memory_limit = rt::cuda_total_bytes(0);
    } else if (memory_limit > 0) {
      check_host_memory_limit(memory_limit);
    }
  }
  int64_t total_tokens = 0, longest = 0;
  for (const auto& s : samples) {
    total_tokens += static_cast<int64_t>(s.tokens.size());
    longest = std::max<int64_t>(longest, static_cast<int64_t>(s.tokens.size()));
  }
  const int64_t window = o.window >= 0 ? o.window : longest > info.max_positions ? 1024 : 0;
  if (o.eval)
    for (const auto& s : samples)
      if (window > static_cast<int64_t>(s.tokens.size()))
        fail("--window " + std::to_string(window) + " is longer than " + s.source + " (" +
             std::to_string(s.tokens.size()) + " tokens): lower --window or raise --max-tokens");
  check_positions_fit_model(o, model, runs, longest);
  check_model_scores_for(model, runs);
  for (auto& r : runs)
    if (r.recompute) r.label = "recompute_" + std::to_string(info.max_positions);
  if (o.recompute_reference && window > info.max_positions)
    fail("--recompute-reference: --window " + std::to_string(window) + " exceeds the model's context " +
         std::to_string(info.max_positions));

  // One pass: every run that evaluates (all but the re-computation oracle) a row of one batch.
  std::vector<size_t> rows;
  for (size_t r = 0; r < runs.size(); ++r)
    if (!runs[r].recompute) rows.push_back(r);
  EvalPass pass;
  pass.one_pass = o.eval && !rows.empty() && (o.one_pass == 1 || (o.one_pass < 0 && rows.size() >= 2));
  pass.rows = pass.one_pass ? static_cast<int64_t>(rows.size()) : 0;
  pass.workers = o.workers > 0 ? o.workers : device.is_cuda() ? 1 : std::max<int64_t>(1, std::thread::hardware_concurrency());
  pass.workers = std::min(pass.workers, std::max<int64_t>(pass.rows, 1));
  if (pass.one_pass && o.one_pass < 0 && !info.per_row_lengths()) {
    pass = EvalPass{};
    std::printf("note: evaluating one method at a time: %s is contract version %lld, and one pass needs version 5 "
                "(examples/python/upgrade_contract.py upgrades it)\n",
                o.model.c_str(), (long long)info.contract_version);
  }

  std::printf("model %s: %lld layers, %lld heads x %lld, vocab %lld, context %lld, contract v%lld; %s/%s\n",
              info.name.c_str(), (long long)info.num_layers, (long long)info.num_heads, (long long)info.head_dim,
              (long long)info.vocab_size, (long long)info.max_positions, (long long)info.contract_version,
              device.str().c_str(), o.dtype.c_str());
  std::printf("%zu sample(s), %lld tokens; positions %s, skip_layers %s; %s\n", samples.size(), (long long)total_tokens,
              o.positions.c_str(), kvc::params::format_int_list(o.skip_layers).c_str(),
              !o.static_cache() ? "concatenating cache"
              : (std::string("static cache, ") + o.schedule + (o.schedule == "chunked" ? " (slack " + std::to_string(o.slack) + ")" : "") +
                 (o.cuda_graph ? ", CUDA graph" : "") + (o.native_step ? ", native step" : "")).c_str());
  if (pass.one_pass)
    std::printf("evaluation: one pass, %lld runs as the rows of one batched decode (static cache, %s%s; %lld "
                "worker%s); TTFT and TPOT from each method's own generation\n",
                (long long)pass.rows, o.schedule == "chunked" ? ("chunked, slack " + std::to_string(o.slack)).c_str() : "every",
                o.cuda_graph ? ", CUDA graph" : "", (long long)pass.workers, pass.workers == 1 ? "" : "s");
  if (pass.one_pass && o.dtype != "float32")
    std::printf("note: in %s a row matches its method's separate pass only to %s rounding of the batched products, "
                "which can also turn a near-tied selection the other way; --no-one-pass evaluates each method on "
                "its own\n",
                o.dtype.c_str(), o.dtype.c_str());
  if (o.throughput)
    std::printf("throughput: contexts %s, batches %s%s, %lld new tokens, %lld repeats (median, min-max)%s\n",
                kvc::params::format_int_list(o.contexts).c_str(), kvc::params::format_int_list(o.batches).c_str(),
                o.largest_batch ? " and the largest that fits" : "", (long long)o.generate, (long long)o.repeats,
                memory_limit > 0 ? (", memory limit " + fixed(memory_limit / kMiB, 0) + " MiB").c_str() : "");
  else if (o.generate > 0)
    std::printf("generation: %lld-token prompt, %lld new tokens, batch %lld, %lld repeats%s (median, min-max)\n",
                (long long)o.prompt_tokens, (long long)o.generate, (long long)o.batch, (long long)o.repeats,
                o.process_per_repeat == 1 ? ", each in a fresh process" : "");
  std::fflush(stdout);

  if (o.results) create_results_dir(out_dir);

  std::vector<int64_t> prompt;
  if (o.generate > 0) {
    const auto& first = samples.front().tokens;
    prompt.assign(first.begin(), first.begin() + std::min<int64_t>(o.prompt_tokens, first.size()));
    o.prompt_tokens = static_cast<int64_t>(prompt.size());
  }

  auto decoder_options = [&](const kvc::Compressor* c, int64_t batch) {
    rt::DecoderOptions d;
    d.compressor = c;
    d.positions = o.rule();
    d.schedule = o.compression_schedule();
    d.batch = batch;
    d.track_positions = trace.enabled();
    d.native_step = o.native_step;
    return d;
  };
  // One decoder per (method, measurement): the fixed-capacity one is sized for its tokens.
  auto decoder = [&](const kvc::Compressor* c, int64_t batch, int64_t total, int64_t first_chunk) {
    return rt::make_decoder(model, decoder_options(c, batch), o.static_cache(), total, first_chunk, o.cuda_graph,
                            o.compress_prefill ? o.prefill_chunk : 0, o.shared_prompt);
  };
  auto evaluate = [&](const kvc::Compressor* c, const std::vector<int64_t>& tokens, rt::RunMetrics& m,
                      const rt::EvalOptions& eo) {
    auto d = decoder(c, 1, static_cast<int64_t>(tokens.size()), 1);
    rt::evaluate(*d, tokens, m, eo);
  };
  {  // Untimed warm-up of both call shapes (one token; a prompt), so the first timed run does
     // not pay for LibTorch's and the GPU's first-call costs.
    rt::RunMetrics scratch;
    const auto& first = samples.front().tokens;
    rt::EvalOptions eo;
    eo.baseline_skip = o.skip_layers;
    evaluate(nullptr, std::vector<int64_t>(first.begin(), first.begin() + std::min<size_t>(8, first.size())), scratch, eo);
    if (o.generate > 0 && o.process_per_repeat != 1 && !o.throughput) {  // else the rounds or points warm up
      auto d = decoder(nullptr, o.batch, o.prompt_tokens + 2, o.prompt_tokens);
      rt::generate(*d, prompt, 2, scratch, o.prefill_chunk, o.skip_layers, o.compress_prefill, o.shared_prompt);
    }
  }
  // Work units for the ETA: an evaluation step, or a generated token (a prompt counts as one).
  const double gen_work = o.throughput ? 0.0 : static_cast<double>(o.repeats * (o.generate + 1));
  double total_work = 0;
  for (const auto& r : runs)
    total_work += (o.eval ? static_cast<double>(total_tokens) : 0.0) + (r.recompute || o.generate == 0 ? 0.0 : gen_work);
  Progress progress(!o.quiet, total_work);
  rt::PeakMemory memory(device);
  // Device memory earlier runs still hold when a run starts, beyond the state after the
  // warm-up: reported beside each run's peak (which includes it), so that memory one run leaves
  // behind shows instead of inflating the next runs' peaks unseen.
  const int64_t floor_bytes = memory.current_bytes();
  auto held_before = [&]() -> int64_t {
    const int64_t now = memory.current_bytes();
    return now < 0 || floor_bytes < 0 ? 0 : std::max<int64_t>(0, now - floor_bytes);
  };
  // First every run's evaluation (quality), then the timed generation in --repeats rounds over
  // all runs, each on a fresh decoder warmed up on its own: a run's repeats are minutes apart and
  // use new buffers and a new graph capture, so their spread covers the drift and the placement
  // that differ between two invocations, not only the jitter of back-to-back steps.
  // What evaluating sample s records: windows, their peaks, progress (`rows` runs per step, the
  // running PPL of `running`).
  auto sample_options = [&](size_t s, int64_t rows_per_step, const rt::RunMetrics& running) {
    rt::EvalOptions eo;
    eo.baseline_skip = o.skip_layers;
    eo.window = window;
    eo.memory = window > 0 ? &memory : nullptr;
    eo.progress = [&, s, rows_per_step, reported = int64_t{0}](int64_t done, int64_t total) mutable {
      progress.add_work(static_cast<double>((done - reported) * rows_per_step));
      reported = done;
      progress.eval(s + 1, samples.size(), done, total, running.ppl());
    };
    return eo;
  };
  // Windows reset the peak as they go: a run's peak is the largest of theirs and what came after.
  auto peak_of = [&](const rt::RunMetrics& m) {
    int64_t peak = memory.peak_bytes();
    for (const auto& w : m.windows) peak = std::max(peak, w.peak_memory_bytes);
    return peak;
  };
  // The next run a generation round times after run `after` (runs.size() for none), shown as
  // the progress's current run.
  auto next_timed = [&](size_t after, int64_t k) {
    size_t r = after;
    while (r < runs.size() && runs[r].recompute) ++r;
    if (r < runs.size()) {
      progress.start_run(runs[r].label, r + 1, runs.size());
      progress.generation(k + 1, o.repeats, o.generate);
    }
    return r;
  };
  // After its last round, a run's line: its figures complete.
  auto finish_run = [&](size_t r, int64_t k) {
    if (k + 1 != o.repeats || round_out.enabled()) return;
    Run& run = runs[r];
    run.metrics.peak_memory_bytes = std::max(run.metrics.peak_memory_bytes, run.generation_peak_bytes);
    run.seconds += run.generation_seconds;
    print_run_line(run, r + 1, runs.size(), baseline_of(runs), false);
  };
  // Round k in a fresh kvbench (rounds.hpp): its lines, as they come, are this process's runs'.
  // What every round's process feeds: the first sample's first tokens (the prompt, and the 8 of
  // the warm-up evaluation), written once.
  std::unique_ptr<PromptFile> round_prompt;
  auto round_in_fresh_process = [&](int64_t k) {
    const std::string what = "generation round " + std::to_string(k + 1) + "/" + std::to_string(o.repeats);
    if (!round_prompt) {
      const auto& first = samples.front().tokens;
      round_prompt = std::make_unique<PromptFile>(
          std::vector<int64_t>(first.begin(), first.begin() + std::max<int64_t>(o.prompt_tokens, std::min<int64_t>(8, first.size()))),
          info.vocab_size);
    }
    next_timed(0, k);
    rt::release_free_host_memory();  // the child's, while it runs
    RoundProcess child(argc, argv, round_prompt->path());
    for (std::string line; child.next_line(line);) {
      const size_t r = add_round_line(line, runs);
      if (runs[r].generations.size() != static_cast<size_t>(k + 1))
        fail(what + ": its process reported " + runs[r].label + " twice");
      progress.add_work(static_cast<double>(o.generate + 1));
      finish_run(r, k);
      next_timed(r + 1, k);
    }
    child.finish(what);
    for (const auto& run : runs)
      if (!run.recompute && run.generations.size() != static_cast<size_t>(k + 1))
        fail(what + ": its process ended without timing " + run.label);
  };
  auto time_round = [&](int64_t k) {
    if (o.process_per_repeat == 1) {
      round_in_fresh_process(k);
      return;
    }
    for (size_t r = 0; r < runs.size(); ++r) {
      Run& run = runs[r];
      if (run.recompute) continue;
      const auto start = std::chrono::steady_clock::now();
      next_timed(r, k);
      memory.reset();
      run.held_before_bytes = std::max(run.held_before_bytes, held_before());
      {
        auto d = decoder(run.compressor.get(), o.batch, o.prompt_tokens + o.generate, o.prompt_tokens);
        run.generations.emplace_back();
        rt::generate(*d, prompt, o.generate, run.generations.back(), o.prefill_chunk, o.skip_layers, o.compress_prefill,
                     o.shared_prompt);
      }
      const int64_t peak = memory.peak_bytes();
      run.generation_peak_bytes = std::max(run.generation_peak_bytes, peak);
      progress.add_work(static_cast<double>(o.generate + 1));
      const double seconds = rt::detail::seconds_since(start);
      run.generation_seconds += seconds;
      if (round_out.enabled()) round_out.write(round_line(r, run, run.generations.back(), seconds, peak));
      finish_run(r, k);
    }
  };
  // The rounds are spread over the run: with an evaluation and two or more repeats, the first
  // round goes before it, so the spread also covers the machine's drift over the evaluation.
  const bool timed = o.generate > 0 && !o.throughput;
  const int64_t early_rounds = timed && o.eval && o.repeats >= 2 ? 1 : 0;
  for (int64_t k = 0; k < early_rounds; ++k) time_round(k);
  if (pass.one_pass) {
    std::vector<rt::DecoderOptions> row_options;
    for (size_t r : rows) row_options.push_back(decoder_options(runs[r].compressor.get(), 1));
    rt::OnePass batch(model, row_options, longest, o.cuda_graph, pass.workers);
    // Each worker runs its own BLAS calls: OpenBLAS's own threads would only compete for the
    // same cores (measured here: the batched step 17.5 ms with them off, 24 ms with them on).
    const kvtools::BlasThreads single_blas(pass.workers > 1 ? 1 : 0);
    {  // untimed: the batch's shapes, as the warm-up above does for one run
      std::vector<rt::RunMetrics> scratch(rows.size());
      const auto& first = samples.front().tokens;
      rt::evaluate_one_pass(batch, std::vector<int64_t>(first.begin(), first.begin() + std::min<size_t>(8, first.size())),
                            scratch);
    }
    const auto start = std::chrono::steady_clock::now();
    progress.start_run("one pass", 1, 1);
    memory.reset();
    std::vector<rt::RunMetrics> metrics(rows.size());
    for (size_t s = 0; s < samples.size(); ++s) {
      rt::EvalOptions eo = sample_options(s, pass.rows, metrics.front());
      if (trace.enabled())
        eo.on_compressed = [&](int64_t step, const rt::Decoder& d) {
          for (size_t i = 0; i < rows.size(); ++i)
            if (&batch.row(static_cast<int64_t>(i)) == &d) trace.record(runs[rows[i]].label, static_cast<int64_t>(s), step, d);
        };
      rt::evaluate_one_pass(batch, samples[s].tokens, metrics, eo);
      pass.step_s.push_back(metrics.front().sample_step_s.back());
    }
    pass.peak_memory_bytes = peak_of(metrics.front());
    pass.seconds = rt::detail::seconds_since(start);
    // Per method, the step time and peak memory of a shared batch would mislead: the pass's are
    // reported once (EvalPass), each method's own come from its generation.
    for (size_t i = 0; i < rows.size(); ++i) {
      Run& run = runs[rows[i]];
      run.metrics = std::move(metrics[i]);
      run.metrics.sample_step_s.clear();
      run.metrics.peak_memory_bytes = -1;
    }
    std::string calls;
    for (const auto& g : batch.groups()) {
      std::string rows_text;
      for (int64_t r : g.rows) rows_text += (rows_text.empty() ? "" : ",") + std::to_string(rows[static_cast<size_t>(r)] + 1);
      calls += (calls.empty() ? "" : "; ") + rows_text +
               (g.shared > 0 ? " (layers 0-" + std::to_string(g.shared - 1) + " once)" : "");
    }
    pass.calls = static_cast<int64_t>(batch.groups().size());
    std::printf("one pass: %lld rows x %lld tokens in %s (%.2f ms per step of all rows); %lld model calls per step, "
                "runs %s\n",
                (long long)pass.rows, (long long)total_tokens, duration_text(pass.seconds).c_str(),
                1e3 * pass.seconds / static_cast<double>(std::max<int64_t>(total_tokens, 1)), (long long)pass.calls,
                calls.c_str());
    for (size_t i = 0; i < rows.size(); ++i)
      print_run_line(runs[rows[i]], rows[i] + 1, runs.size(), baseline_of(runs), timed);
  }
  for (size_t r = 0; o.eval && r < runs.size(); ++r) {
    Run& run = runs[r];
    const auto run_start = std::chrono::steady_clock::now();
    progress.start_run(run.label, r + 1, runs.size());
    memory.reset();
    run.held_before_bytes = std::max(run.held_before_bytes, held_before());
    if (run.recompute) {
      for (const auto& sample : samples) rt::evaluate_recompute(model, sample.tokens, window, info.max_positions, run.metrics);
      run.metrics.peak_memory_bytes = memory.peak_bytes();
      progress.add_work(static_cast<double>(total_tokens));
      run.seconds = rt::detail::seconds_since(run_start);
      print_run_line(run, r + 1, runs.size(), baseline_of(runs), false);
      continue;
    }
    if (pass.one_pass) continue;  // evaluated above
    for (size_t s = 0; s < samples.size(); ++s) {
      rt::EvalOptions eo = sample_options(s, 1, run.metrics);
      if (trace.enabled())
        eo.on_compressed = [&](int64_t step, const rt::Decoder& d) {
          trace.record(run.label, static_cast<int64_t>(s), step, d);
        };
      evaluate(run.compressor.get(), samples[s].tokens, run.metrics, eo);
    }
    run.metrics.peak_memory_bytes = peak_of(run.metrics);
    run.seconds = rt::detail::seconds_since(run_start);
    print_run_line(run, r + 1, runs.size(), baseline_of(runs), timed);
  }
  for (int64_t k = early_rounds; timed && k < o.repeats; ++k) time_round(k);
  if (round_out.enabled()) return 0;

  // --throughput: per run and context, the listed batches up to the first that does not fit,
  // then (--largest-batch) the search for the largest that does.
  std::vector<ThroughputPoint> points;
  std::vector<std::pair<size_t, int64_t>> largest_keys;
  std::vector<int64_t> largest;
  constexpr int64_t kLargestBatchCap = int64_t{1} << 16;
  auto measure_point = [&](size_t r, int64_t context, int64_t batch) {
    ThroughputPoint p;
    p.run = r;
    p.context = context;
    p.batch = batch;
    const auto& first = samples.front().tokens;
    const std::vector<int64_t> ctx(first.begin(), first.begin() + context);
    std::vector<double> ttft, tpot, tok_s;
    memory.reset();
    try {
      for (int64_t k = 0; k < o.repeats; ++k) {
        rt::RunMetrics m;
        auto d = decoder(runs[r].compressor.get(), batch, context + o.generate, context);
        rt::generate(*d, ctx, o.generate, m, o.prefill_chunk, o.skip_layers, o.compress_prefill, o.shared_prompt);
        const double step = m.gen_later_s / static_cast<double>(m.gen_later_steps);
        ttft.push_back(m.gen_ttft_s);
        tpot.push_back(step);
        tok_s.push_back(static_cast<double>(batch) / step);
        p.cache_tokens = m.gen_cache_tokens;
      }
      p.peak_bytes = memory.peak_bytes();
      p.fits = memory_limit <= 0 || p.peak_bytes <= memory_limit;
      if (!p.fits)
        p.why = "peak " + fixed(p.peak_bytes / kMiB, 0) + " MiB over the limit of " + fixed(memory_limit / kMiB, 0) + " MiB";
    } catch (const std::exception& e) {
      if (!is_out_of_memory(e)) throw;
      p.peak_bytes = memory.peak_bytes();
      p.why = "out of memory: " + rt::first_line(e);
      rt::cuda_release_cached();  // an allocation that failed leaves the cache fragmented
    }
    p.ttft = Spread::of(ttft);
    p.tpot = Spread::of(tpot);
    p.tok_s = Spread::of(tok_s);
    std::printf("[throughput] %-20s context %lld batch %lld: %s\n", runs[r].label.c_str(), (long long)context,
                (long long)batch,
                p.fits ? ("TPOT " + ms_spread(p.tpot) + " ms, " + fixed(p.tok_s.median, 0) + " tok/s, peak " +
                          fixed(p.peak_bytes / kMiB, 0) + " MiB").c_str()
                       : ("does not fit (" + p.why + ")").c_str());
    std::fflush(stdout);
    return p;
  };
  for (size_t r = 0; o.throughput && r < runs.size(); ++r) {
    if (runs[r].recompute) continue;
    for (int64_t context : o.contexts) {
      std::vector<int64_t> batches = o.batches;
      std::sort(batches.begin(), batches.end());
      batches.erase(std::unique(batches.begin(), batches.end()), batches.end());
      std::vector<ThroughputPoint> mine;
      for (int64_t b : batches) {
        mine.push_back(measure_point(r, context, b));
        if (!mine.back().fits) break;  // the larger listed batches would not fit either
      }
      if (o.largest_batch) {
        largest_keys.emplace_back(r, context);
        largest.push_back(find_largest_batch(mine, memory_limit, kLargestBatchCap,
                                             [&](int64_t b) { return measure_point(r, context, b); }));
      }
      points.insert(points.end(), mine.begin(), mine.end());
    }
  }

  trace.close();
  print_tables(o, runs, pass);
  print_windows(runs);
  if (o.throughput) print_throughput(runs, points, largest_keys, largest);
  Json results = results_json(o, model, samples, runs, window, pass);
  if (o.throughput)
    results["throughput"] = throughput_json(runs, points, o.contexts, o.generate, memory_limit, largest_keys, largest);
  if (!o.json.empty()) write_atomically("--json", o.json, results.dump(1) + "\n");
  if (!o.csv.empty()) write_atomically("--csv", o.csv, results_csv(results));
  if (o.results) {
    write_atomically("results", out_dir + "/results.json", results.dump(1) + "\n");
    write_atomically("results", out_dir + "/results.csv", results_csv(results));
    draw_plots(out_dir, out_dir + "/results.json", o.trace);
    std::printf("\nresults: %s/ (results.json, results.csv, figures; plot.sh redraws them) after %s\n", out_dir.c_str(),
                duration_text(progress.elapsed_s()).c_str());
  } else if (!o.trace.empty()) {
    std::printf("\ntrace: %s (draw it: python3 %s/plot_trace.py %s --out-dir DIR)\n", o.trace.c_str(), KVC_PYTHON_DIR,
                o.trace.c_str());
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace
}  // namespace kvbench

int main(int argc, char** argv) {
  try {
    return kvbench::run(argc, argv);
  } catch (const std::exception& e) {
    // One line, every unprintable byte of a quoted path or spec escaped (never cut at a NUL).
    std::fprintf(stderr, "kvbench: error: %s\n", kvcompress::params::printable(kvcompress::runtime::first_line(e)).c_str());
    return 2;
  }
}
