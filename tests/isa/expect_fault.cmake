# Runs COMMAND (a ;-list) and succeeds only if it does not exit 0 (the control of the ODR test:
# the program without the ABI namespace must fault on a CPU without AVX2).
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc STREQUAL "0")
  message(FATAL_ERROR "expected a fault, but the program ran to the end:\n${out}")
endif()
message(STATUS "faulted as expected: ${rc}")
