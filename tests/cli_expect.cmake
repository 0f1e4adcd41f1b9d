# Runs one kvbench command line (CMD, a ;-list) and checks that it fails with exit code 2 and a
# one-line message on stderr matching EXPECT: no stack trace, crash or hang.
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
if(NOT rc EQUAL 2)
  message(FATAL_ERROR "expected exit code 2, got '${rc}'\nstdout: ${out}\nstderr: ${err}")
endif()
string(STRIP "${err}" err)
if(NOT err MATCHES "^kvbench: error: [^\n]*$")
  message(FATAL_ERROR "expected one line 'kvbench: error: ...', got:\n${err}")
endif()
if(NOT err MATCHES "${EXPECT}")
  message(FATAL_ERROR "message does not match '${EXPECT}':\n${err}")
endif()
message(STATUS "ok: ${err}")
