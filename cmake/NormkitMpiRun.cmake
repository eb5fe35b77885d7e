# normkit_add_mpi_test(<name> <np> <target> [args...]): a ctest test running <target> on <np>
# processes through MPI's launcher (FindMPI's MPIEXEC_EXECUTABLE, e.g. mpiexec -n <np>), with
# a TIMEOUT so that a hang fails the test instead of stalling the run. Included by tests/ and
# examples/ when normkit::mpi exists.
#
# Open MPI's launcher refuses more processes than cores without --oversubscribe (a 2-core CI
# machine runs -n 4) and refuses to run as root without --allow-run-as-root (CI containers
# run as root): both are added for Open MPI, the latter only when CMake runs as root (the
# user that configures is the one that runs ctest). Other MPIs (MPICH's hydra accepts any
# process count and root) get neither. -DNORMKIT_MPIEXEC_EXTRA_FLAGS="..." overrides this.
include_guard(GLOBAL)

# Decided once, kept in a global property (the directories that include this file see it).
if(DEFINED NORMKIT_MPIEXEC_EXTRA_FLAGS)
  set(_nk_mpiexec_flags ${NORMKIT_MPIEXEC_EXTRA_FLAGS})
else()
  set(_nk_mpiexec_flags "")
  if(MPIEXEC_EXECUTABLE)
    execute_process(COMMAND "${MPIEXEC_EXECUTABLE}" --version
                    OUTPUT_VARIABLE _nk_mpiexec_version ERROR_VARIABLE _nk_mpiexec_version
                    RESULT_VARIABLE _nk_mpiexec_rc)
    if(_nk_mpiexec_version MATCHES "Open MPI|OpenRTE")
      list(APPEND _nk_mpiexec_flags --oversubscribe)
      execute_process(COMMAND id -u OUTPUT_VARIABLE _nk_uid ERROR_QUIET
                      OUTPUT_STRIP_TRAILING_WHITESPACE)
      if(_nk_uid STREQUAL "0")
        list(APPEND _nk_mpiexec_flags --allow-run-as-root)
      endif()
    endif()
  endif()
endif()
set_property(GLOBAL PROPERTY NORMKIT_MPIEXEC_FLAGS "${_nk_mpiexec_flags}")
list(JOIN _nk_mpiexec_flags " " _nk_shown)
message(STATUS "normkit: MPI tests run ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} <n> ${_nk_shown}")

function(normkit_add_mpi_test name np target)
  if(NOT MPIEXEC_EXECUTABLE)
    message(STATUS "normkit: no MPI launcher (mpiexec) found, skipping test ${name}")
    return()
  endif()
  get_property(flags GLOBAL PROPERTY NORMKIT_MPIEXEC_FLAGS)
  add_test(NAME ${name}
           COMMAND "${MPIEXEC_EXECUTABLE}" ${MPIEXEC_NUMPROC_FLAG} ${np} ${flags}
                   ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${target}> ${MPIEXEC_POSTFLAGS} ${ARGN})
  # PROCESSORS: ctest -j counts the processes, so a 4-process run does not share the machine
  # with three other tests.
  set_tests_properties(${name} PROPERTIES TIMEOUT 60 PROCESSORS ${np} LABELS mpi)
  # Sanitizer builds: slower, so a longer timeout; and no LeakSanitizer, which reports Open
  # MPI's own allocations at exit (MPI_Init's, in plugins unloaded by MPI_Finalize, which no
  # suppression can name). AddressSanitizer and UBSan still check every rank.
  if(CMAKE_CXX_FLAGS MATCHES "-fsanitize")
    set_tests_properties(${name} PROPERTIES TIMEOUT 600
      ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
  endif()
endfunction()
