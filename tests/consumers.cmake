# Consumer projects: tests/consumers/* each build a main.cpp linking normkit the way a user's
# project would (the recipes of the README's "Integration" section), with the same compiler,
# offline, and run it.
#   consumer.find_package.install -> cmake --install of this build into a prefix (FIXTURES_SETUP)
#   consumer.find_package         -> find_package(normkit 0.1 CONFIG REQUIRED), CMAKE_PREFIX_PATH=<prefix>
#   consumer.add_subdirectory     -> add_subdirectory(<checkout>)
#   consumer.fetchcontent         -> FetchContent_Declare(normkit SOURCE_DIR <checkout>)
#   consumer.fetchcontent_git     -> FetchContent_Declare(normkit GIT_REPOSITORY file://<checkout>
#                                    GIT_TAG <HEAD commit>): a clone, so only committed files
#   consumer.fetchcontent_git.installed -> the same declaration with FIND_PACKAGE_ARGS (3.24+)
#                                    and the installed prefix: find_package wins, nothing cloned
#   consumer.safetensors.find_package / .add_subdirectory -> normkit::safetensors (nlohmann_json)
#                                    writes and reads back a state dict with safetensors.hpp
#   consumer.mpi.find_package     -> find_package(normkit ... COMPONENTS mpi): normkit::mpi
#                                    (MPI), SyncBatchNorm as one process
# Included from tests/CMakeLists.txt; the top-level source dir is the checkout.
set(_nk_consumers_src "${CMAKE_CURRENT_LIST_DIR}/consumers")
set(_nk_consumers_bin "${CMAKE_CURRENT_BINARY_DIR}/consumers")
set(_nk_checkout "${PROJECT_SOURCE_DIR}")

set(_nk_consumer_options "-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}")
if(CMAKE_BUILD_TYPE)
  list(APPEND _nk_consumer_options "-DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE}")
endif()
if(Eigen3_DIR)
  list(APPEND _nk_consumer_options "-DEigen3_DIR=${Eigen3_DIR}")
endif()
if(nlohmann_json_DIR)
  list(APPEND _nk_consumer_options "-Dnlohmann_json_DIR=${nlohmann_json_DIR}")
endif()

# ctest --build-and-test configures, builds and runs one consumer in a fresh build dir.
#   _normkit_add_consumer_test(<test name> [SOURCE <dir under consumers/>] [OPTIONS -D...])
function(_normkit_add_consumer_test name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "SOURCE" "OPTIONS")
  if(NOT arg_SOURCE)
    set(arg_SOURCE "${name}")
  endif()
  set(bin "${_nk_consumers_bin}/${name}")
  add_test(NAME consumer.${name}
    COMMAND "${CMAKE_CTEST_COMMAND}" --build-and-test "${_nk_consumers_src}/${arg_SOURCE}" "${bin}"
      --build-generator "${CMAKE_GENERATOR}"
      --build-makeprogram "${CMAKE_MAKE_PROGRAM}"
      --build-noclean
      --build-options ${_nk_consumer_options} ${arg_OPTIONS}
      --test-command consumer
    COMMAND_EXPAND_LISTS)
  set_tests_properties(consumer.${name} PROPERTIES LABELS consumer TIMEOUT 300)
endfunction()

# find_package: install this build into a prefix first (a CTest fixture, as nlohmann does).
if(NORMKIT_INSTALL)
  set(_nk_prefix "${CMAKE_BINARY_DIR}/consumer-prefix")
  get_property(_nk_multi GLOBAL PROPERTY GENERATOR_IS_MULTI_CONFIG)
  set(_nk_config_arg "")
  if(_nk_multi)
    set(_nk_config_arg --config $<CONFIG>)
  endif()
  add_test(NAME consumer.find_package.install
    COMMAND "${CMAKE_COMMAND}" --install "${CMAKE_BINARY_DIR}" --prefix "${_nk_prefix}" ${_nk_config_arg})
  set_tests_properties(consumer.find_package.install PROPERTIES
    FIXTURES_SETUP normkit_installed LABELS consumer)
  _normkit_add_consumer_test(find_package OPTIONS "-DCMAKE_PREFIX_PATH=${_nk_prefix}")
  set_tests_properties(consumer.find_package PROPERTIES FIXTURES_REQUIRED normkit_installed)
else()
  message(STATUS "normkit: NORMKIT_INSTALL is OFF, skipping the find_package consumer tests")
endif()

_normkit_add_consumer_test(add_subdirectory OPTIONS "-DNORMKIT_SOURCE_DIR=${_nk_checkout}")
_normkit_add_consumer_test(compiled OPTIONS "-DNORMKIT_SOURCE_DIR=${_nk_checkout}")
_normkit_add_consumer_test(fetchcontent OPTIONS "-DNORMKIT_SOURCE_DIR=${_nk_checkout}")

# FetchContent from git. The clone sees commits only, so the test builds the checkout's HEAD
# commit, whatever the working tree holds; it needs the source dir to be the top of a git
# checkout (not a tarball, not a directory inside another project's repository).
# FETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER: clone even where a normkit is installed.
find_package(Git QUIET)
set(_nk_head "")
if(GIT_FOUND)
  execute_process(COMMAND "${GIT_EXECUTABLE}" rev-parse --show-toplevel HEAD
    WORKING_DIRECTORY "${_nk_checkout}"
    RESULT_VARIABLE _nk_git_rc OUTPUT_VARIABLE _nk_git_out ERROR_QUIET
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_nk_git_rc EQUAL 0)
    string(REPLACE "\n" ";" _nk_git_out "${_nk_git_out}")
    list(GET _nk_git_out 0 _nk_git_top)
    list(GET _nk_git_out 1 _nk_git_head)
    get_filename_component(_nk_git_top "${_nk_git_top}" REALPATH)
    get_filename_component(_nk_checkout_real "${_nk_checkout}" REALPATH)
    if(_nk_git_top STREQUAL _nk_checkout_real)
      set(_nk_head "${_nk_git_head}")
    endif()
  endif()
endif()
if(_nk_head)
  _normkit_add_consumer_test(fetchcontent_git OPTIONS
    "-DNORMKIT_GIT_REPOSITORY=file://${_nk_checkout}"
    "-DNORMKIT_GIT_TAG=${_nk_head}"
    "-DNORMKIT_EXPECT=clone"
    "-DFETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER")
  execute_process(COMMAND "${GIT_EXECUTABLE}" status --porcelain --untracked-files=no
    WORKING_DIRECTORY "${_nk_checkout}" OUTPUT_VARIABLE _nk_git_dirty ERROR_QUIET)
  if(_nk_git_dirty)
    message(STATUS "normkit: consumer.fetchcontent_git builds commit ${_nk_head}; "
                   "uncommitted changes are not part of it")
  endif()
  # Reconfigure when HEAD moves (a commit, a checkout), so the test follows the new commit.
  execute_process(COMMAND "${GIT_EXECUTABLE}" rev-parse --git-path HEAD
    WORKING_DIRECTORY "${_nk_checkout}" OUTPUT_VARIABLE _nk_git_head_file ERROR_QUIET
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  execute_process(COMMAND "${GIT_EXECUTABLE}" symbolic-ref -q HEAD
    WORKING_DIRECTORY "${_nk_checkout}" OUTPUT_VARIABLE _nk_git_ref ERROR_QUIET
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  set(_nk_git_watch "${_nk_git_head_file}")
  if(_nk_git_ref)
    execute_process(COMMAND "${GIT_EXECUTABLE}" rev-parse --git-path "${_nk_git_ref}"
      WORKING_DIRECTORY "${_nk_checkout}" OUTPUT_VARIABLE _nk_git_ref_file ERROR_QUIET
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    list(APPEND _nk_git_watch "${_nk_git_ref_file}")
  endif()
  foreach(_nk_f IN LISTS _nk_git_watch)
    if(NOT IS_ABSOLUTE "${_nk_f}")
      set(_nk_f "${_nk_checkout}/${_nk_f}")
    endif()
    if(EXISTS "${_nk_f}")
      set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_nk_f}")
    endif()
  endforeach()
else()
  message(STATUS "normkit: ${_nk_checkout} is not the top of a git checkout (or git is "
                 "missing), skipping consumer.fetchcontent_git")
endif()
if(NORMKIT_INSTALL AND NOT CMAKE_VERSION VERSION_LESS 3.24)
  # Nothing may be cloned here: the repository URL does not exist.
  _normkit_add_consumer_test(fetchcontent_git.installed SOURCE fetchcontent_git OPTIONS
    "-DNORMKIT_GIT_REPOSITORY=file://${CMAKE_CURRENT_BINARY_DIR}/no-such-repository"
    "-DNORMKIT_GIT_TAG=main"
    "-DNORMKIT_EXPECT=installed"
    "-DCMAKE_PREFIX_PATH=${_nk_prefix}")
  set_tests_properties(consumer.fetchcontent_git.installed PROPERTIES
    FIXTURES_REQUIRED normkit_installed)
endif()

# normkit::safetensors (safetensors.hpp needs nlohmann_json): two consumers, through
# find_package(... COMPONENTS safetensors) and add_subdirectory (state_dict_test and
# safetensors_hostile_test are in tests/CMakeLists.txt).
if(TARGET normkit::safetensors)
  if(NORMKIT_INSTALL)
    _normkit_add_consumer_test(safetensors.find_package SOURCE safetensors OPTIONS
      "-DNORMKIT_CONSUME=find_package" "-DCMAKE_PREFIX_PATH=${_nk_prefix}")
    set_tests_properties(consumer.safetensors.find_package PROPERTIES
      FIXTURES_REQUIRED normkit_installed)
  endif()
  _normkit_add_consumer_test(safetensors.add_subdirectory SOURCE safetensors OPTIONS
    "-DNORMKIT_CONSUME=add_subdirectory" "-DNORMKIT_SOURCE_DIR=${_nk_checkout}")
else()
  message(STATUS "normkit: no normkit::safetensors, skipping the safetensors consumers")
endif()

# normkit::mpi (mpi.hpp needs MPI): a consumer through find_package(... COMPONENTS mpi),
# run as one process (an MPI singleton, no launcher).
if(TARGET normkit::mpi AND NORMKIT_INSTALL)
  _normkit_add_consumer_test(mpi.find_package SOURCE mpi OPTIONS
    "-DCMAKE_PREFIX_PATH=${_nk_prefix}")
  set_tests_properties(consumer.mpi.find_package PROPERTIES FIXTURES_REQUIRED normkit_installed)
endif()
