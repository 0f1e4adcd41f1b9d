# Runs kvbench (CMD, a ;-list), which must succeed, then the results checker (CHECK, a ;-list:
# the python and check_kvbench_results.py with its arguments).
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 900)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "kvbench failed (${rc}):\n${out}\n${err}")
endif()
execute_process(COMMAND ${CHECK} RESULT_VARIABLE rc OUTPUT_VARIABLE cout ERROR_VARIABLE cerr)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${cout}${cerr}\nkvbench's output was:\n${out}")
endif()
message(STATUS "${out}${cout}")
