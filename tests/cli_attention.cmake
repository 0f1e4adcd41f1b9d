# Runs kvbench --compare-attention at one budget and checks its rows: every attention-aware
# method beside its key-norm proxy with the same split of the budget, each kept at the budget,
# each with a perplexity in range (the per-head budgets hold twice the slots).
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 600)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "kvbench failed (${rc}):\n${out}\n${err}")
endif()
file(READ "${JSON}" doc)
set(want
    "baseline|"
    "streaming_llm_32|streaming_llm(start_size=4, recent_size=28, "
    "h2o_l2_32|h2o_l2(start_size=4, heavy_hitter_size=4, recent_size=24, "
    "h2o_attention_32|h2o_attention(start_size=4, heavy_hitter_size=4, recent_size=24, decay_factor=0.9, "
    "h2o_32|h2o(heavy_hitter_size=16, recent_size=16, "
    "snapkv_lite_32|snapkv_lite(observation_window=2, keep_size=32, "
    "snapkv_32|snapkv(observation_window=2, keep_size=32, pooling_kernel=5, pooling=avg, "
    "tova_32|tova(cache_size=32, heads=mean, "
    # Per-head budgets hold head_cap (2) times the slots, half of them hidden.
    "adakv_h2o_32|adakv_h2o(heavy_hitter_size=16, recent_size=16, alpha_safeguard=0.2, head_cap=2.0, |64"
    "adakv_snapkv_32|adakv_snapkv(observation_window=2, keep_size=32, pooling_kernel=5, pooling=avg, alpha_safeguard=0.2, head_cap=2.0, |64")
string(JSON n LENGTH "${doc}" results)
list(LENGTH want expected)
if(NOT n EQUAL expected)
  message(FATAL_ERROR "expected ${expected} results, got ${n}")
endif()
set(i 0)
foreach(row IN LISTS want)
  string(REPLACE "|" ";" parts "${row}")
  list(GET parts 0 label)
  string(JSON got_label GET "${doc}" results ${i} label)
  string(JSON spec GET "${doc}" results ${i} spec)
  string(JSON ppl GET "${doc}" results ${i} ppl)
  string(JSON tokens GET "${doc}" results ${i} cache_tokens)
  if(NOT got_label STREQUAL label)
    message(FATAL_ERROR "result ${i}: label '${got_label}', want '${label}'")
  endif()
  list(LENGTH parts np)
  if(np GREATER 1)
    list(GET parts 1 prefix)
    set(want_tokens 32)
    if(np GREATER 2)
      list(GET parts 2 want_tokens)
    endif()
    string(FIND "${spec}" "${prefix}" at)
    if(NOT at EQUAL 0 OR NOT tokens EQUAL want_tokens)
      message(FATAL_ERROR "${label}: spec '${spec}' (want it to start '${prefix}'), cache_tokens ${tokens} (want ${want_tokens})")
    endif()
  endif()
  if(NOT ppl GREATER 1 OR NOT ppl LESS 6144)
    message(FATAL_ERROR "${label}: ppl ${ppl} out of range")
  endif()
  math(EXPR i "${i} + 1")
endforeach()
message(STATUS "compare-attention ok: ${n} results")
