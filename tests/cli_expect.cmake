# Runs one command line of a tool (CMD, a ;-list; TOOL names it, default kvbench) and checks
# that it fails with exit code 2 and a one-line message on stderr matching EXPECT: no stack
# trace, crash or hang.
if(NOT DEFINED TOOL)
  set(TOOL kvbench)
endif()
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
if(NOT rc EQUAL 2)
  message(FATAL_ERROR "expected exit code 2, got '${rc}'\nstdout: ${out}\nstderr: ${err}")
endif()
string(STRIP "${err}" err)
if(NOT err MATCHES "^${TOOL}: error: [^\n]*$")
  message(FATAL_ERROR "expected one line '${TOOL}: error: ...', got:\n${err}")
endif()
if(NOT err MATCHES "${EXPECT}")
  message(FATAL_ERROR "message does not match '${EXPECT}':\n${err}")
endif()
message(STATUS "ok: ${err}")
