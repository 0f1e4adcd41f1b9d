# Text in and out on a model that embeds Pythia's tokenizer.json (made by make_text_models.py):
# kvtok's ids equal Hugging Face's for a bundled eval text and decode back to it; kvbench --text
# reads a bundled book through the embedded tokenizer and compresses; kvgen continues a prompt.
# Variables: KVTOK, KVBENCH, KVGEN, MODEL, DATA (data/), REF (reference/gpt_neox_tokenizer), OUT.
set(book pg10321_dragons_blood)
function(run_ok)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\nstdout: ${out}\nstderr: ${err}")
  endif()
  set(out "${out}" PARENT_SCOPE)
  set(err "${err}" PARENT_SCOPE)
endfunction()

run_ok(${KVTOK} --tokenizer ${MODEL} --encode ${DATA}/eval_text/${book}.txt --out ${OUT}/${book}.ids --name gpt-neox-20b)
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${OUT}/${book}.ids ${REF}/${book}.ids RESULT_VARIABLE same)
if(NOT same EQUAL 0)
  message(FATAL_ERROR "kvtok --encode: ids differ from Hugging Face's (${REF}/${book}.ids)")
endif()
run_ok(${KVTOK} --tokenizer ${MODEL} --decode ${OUT}/${book}.ids --out ${OUT}/${book}.txt)
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${OUT}/${book}.txt ${DATA}/eval_text/${book}.txt RESULT_VARIABLE same)
if(NOT same EQUAL 0)
  message(FATAL_ERROR "kvtok --decode does not give the text back")
endif()

file(MAKE_DIRECTORY ${OUT}/saved)
run_ok(${KVBENCH} --quiet --no-results --model ${MODEL} --text ${DATA}/books/${book}.txt --max-tokens 160 --positions cache
       --method "streaming_llm(start_size=4, recent_size=60)" --generate 4 --prompt-tokens 32 --json ${OUT}/text.json
       --save-tokens ${OUT}/saved)
# The ids it evaluated: the first 160 of Hugging Face's (the eval text is the book's beginning).
function(read_ids path var)  # the ids of a kvcompress-tokens file, as a list
  file(READ ${path} text)
  string(FIND "${text}" "\n" eol)
  math(EXPR eol "${eol} + 1")
  string(SUBSTRING "${text}" ${eol} -1 text)
  string(STRIP "${text}" text)
  string(REGEX REPLACE "[ \n]+" ";" text "${text}")
  set(${var} "${text}" PARENT_SCOPE)
endfunction()
read_ids(${OUT}/saved/${book}.ids saved)
read_ids(${REF}/${book}.ids ref)
list(LENGTH saved n)
if(NOT n EQUAL 160)
  message(FATAL_ERROR "kvbench --save-tokens wrote ${n} ids, expected 160")
endif()
list(SUBLIST ref 0 160 ref)
if(NOT saved STREQUAL ref)
  message(FATAL_ERROR "kvbench --text evaluated other ids than Hugging Face's:\n${saved}\n${ref}")
endif()
if(NOT out MATCHES "1 sample\\(s\\), 160 tokens")
  message(FATAL_ERROR "kvbench --text: unexpected report:\n${out}")
endif()
file(READ ${OUT}/text.json json)
string(JSON cache GET "${json}" results 1 cache_tokens)
if(NOT cache EQUAL 64)
  message(FATAL_ERROR "kvbench --text: streaming_llm kept ${cache} tokens, expected 64")
endif()

run_ok(${KVGEN} --model ${MODEL} --prompt "It was the best of times" --max-new-tokens 12 --ignore-eos
       --method "streaming_llm(start_size=2, recent_size=6)")
if(NOT out MATCHES "^It was the best of times" OR NOT err MATCHES "6 prompt tokens, 12 new" OR NOT err MATCHES "cache: 8\\.\\.8 tokens")
  message(FATAL_ERROR "kvgen: unexpected output:\nstdout: ${out}\nstderr: ${err}")
endif()
message(STATUS "ok: kvtok, kvbench --text and kvgen on an embedded tokenizer.json")
