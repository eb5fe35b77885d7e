# Consumer projects (STYLE.md §3.10): tests/consumers/* each build a main.cpp linking
# normkit::normkit, with the same compiler, offline, and run it.
#   consumer.find_package.install -> cmake --install of this build into a prefix (FIXTURES_SETUP)
#   consumer.find_package         -> find_package(normkit CONFIG) with CMAKE_PREFIX_PATH=<prefix>
#   consumer.add_subdirectory     -> add_subdirectory(<checkout>)
#   consumer.fetchcontent         -> FetchContent_Declare(normkit SOURCE_DIR <checkout>)
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

# ctest --build-and-test configures, builds and runs one consumer in a fresh build dir.
function(_normkit_add_consumer_test name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "" "OPTIONS")
  set(bin "${_nk_consumers_bin}/${name}")
  add_test(NAME consumer.${name}
    COMMAND "${CMAKE_CTEST_COMMAND}" --build-and-test "${_nk_consumers_src}/${name}" "${bin}"
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
  message(STATUS "normkit: NORMKIT_INSTALL is OFF, skipping the find_package consumer test")
endif()

_normkit_add_consumer_test(add_subdirectory OPTIONS "-DNORMKIT_SOURCE_DIR=${_nk_checkout}")
_normkit_add_consumer_test(fetchcontent OPTIONS "-DNORMKIT_SOURCE_DIR=${_nk_checkout}")

# state_dict_test, safetensors_hostile_test (include/normkit/state_dict.hpp, safetensors.hpp): the
# safetensors header needs nlohmann/json, which normkit::normkit does not link. Registered here so
# that tests/CMakeLists.txt needs only the one include line.
find_package(nlohmann_json 3 QUIET)
if(nlohmann_json_FOUND)
  normkit_add_test(state_dict_test state_dict_test.cpp)
  target_link_libraries(state_dict_test PRIVATE nlohmann_json::nlohmann_json)
  # Hostile files (issue #15); also replays the file fuzzer's corpus through its invariants.
  normkit_add_test(safetensors_hostile_test safetensors_hostile_test.cpp)
  target_link_libraries(safetensors_hostile_test PRIVATE nlohmann_json::nlohmann_json)
  target_compile_definitions(safetensors_hostile_test PRIVATE
    NORMKIT_SAFETENSORS_CORPUS_DIR="${CMAKE_CURRENT_SOURCE_DIR}/fuzz/corpus_safetensors")
else()
  message(STATUS "normkit: nlohmann_json not found (apt-get install nlohmann-json3-dev), skipping state_dict_test and safetensors_hostile_test")
endif()
