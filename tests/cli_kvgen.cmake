# kvgen on the bundled model (SentencePiece): the prompt, then text, on standard output; the
# figures on standard error, the cache at the method's budget.
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "kvgen failed (${rc}):\nstdout: ${out}\nstderr: ${err}")
endif()
string(LENGTH "${out}" n)
if(NOT out MATCHES "^It was a dark and stormy night" OR n LESS 60)
  message(FATAL_ERROR "kvgen: expected the prompt and a continuation, got:\n${out}")
endif()
if(NOT err MATCHES "24 new: first token after [0-9.]+ s .*then [0-9.]+ tokens/s" OR NOT err MATCHES "cache: 16\\.\\.16 tokens per layer")
  message(FATAL_ERROR "kvgen: unexpected figures:\n${err}")
endif()
message(STATUS "ok:\n${out}${err}")
