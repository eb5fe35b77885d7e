# Install and export rules, included from the top-level CMakeLists when NORMKIT_INSTALL is ON
# (by default when normkit is the top-level project). The package is architecture-independent (header-only), so the CMake
# and pkg-config files go under DATADIR, as nlohmann_json does.
include(CMakePackageConfigHelpers)

set(NORMKIT_CONFIG_INSTALL_DIR "${CMAKE_INSTALL_DATADIR}/cmake/normkit"
    CACHE STRING "Where normkitConfig.cmake is installed, relative to the prefix")
set(NORMKIT_PKGCONFIG_INSTALL_DIR "${CMAKE_INSTALL_DATADIR}/pkgconfig"
    CACHE STRING "Where normkit.pc is installed, relative to the prefix")
mark_as_advanced(NORMKIT_CONFIG_INSTALL_DIR NORMKIT_PKGCONFIG_INSTALL_DIR)

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        COMPONENT normkit_Development
        FILES_MATCHING PATTERN "*.hpp")

install(TARGETS normkit EXPORT normkitTargets)
if(NORMKIT_COMPILED)
  # The compiled mode's library (architecture-dependent, unlike the headers).
  install(TARGETS normkit_compiled EXPORT normkitTargets
          ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}" COMPONENT normkit_Development)
endif()
install(EXPORT normkitTargets
        NAMESPACE normkit::
        DESTINATION "${NORMKIT_CONFIG_INSTALL_DIR}"
        COMPONENT normkit_Development)

configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/normkitConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/normkitConfig.cmake"
  INSTALL_DESTINATION "${NORMKIT_CONFIG_INSTALL_DIR}")
# ARCH_INDEPENDENT (3.14): a 32-bit consumer may use a copy installed by a 64-bit build --
# unless the compiled mode's library is installed too.
if(NORMKIT_COMPILED)
  set(_nk_arch "")
else()
  set(_nk_arch ARCH_INDEPENDENT)
endif()
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/normkitConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMajorVersion
  ${_nk_arch})
install(FILES "${PROJECT_BINARY_DIR}/normkitConfig.cmake"
              "${PROJECT_BINARY_DIR}/normkitConfigVersion.cmake"
        DESTINATION "${NORMKIT_CONFIG_INSTALL_DIR}"
        COMPONENT normkit_Development)

# Build-tree export (as fmt does): find_package(normkit) with normkit_DIR=<build dir> works
# without installing.
export(EXPORT normkitTargets
       NAMESPACE normkit::
       FILE "${PROJECT_BINARY_DIR}/normkitTargets.cmake")

# normkit::safetensors (when nlohmann_json was found) goes into a file of its own, which
# normkitConfig.cmake includes only when it finds nlohmann_json: consumers of normkit::normkit
# alone never need nlohmann_json.
if(TARGET normkit_safetensors)
  install(TARGETS normkit_safetensors EXPORT normkitSafetensorsTargets)
  install(EXPORT normkitSafetensorsTargets
          NAMESPACE normkit::
          DESTINATION "${NORMKIT_CONFIG_INSTALL_DIR}"
          COMPONENT normkit_Development)
  export(EXPORT normkitSafetensorsTargets
         NAMESPACE normkit::
         FILE "${PROJECT_BINARY_DIR}/normkitSafetensorsTargets.cmake")
endif()

# normkit::mpi (when MPI was found), likewise in a file of its own, which normkitConfig.cmake
# includes only when it finds MPI.
if(TARGET normkit_mpi)
  install(TARGETS normkit_mpi EXPORT normkitMpiTargets)
  install(EXPORT normkitMpiTargets
          NAMESPACE normkit::
          DESTINATION "${NORMKIT_CONFIG_INSTALL_DIR}"
          COMPONENT normkit_Development)
  export(EXPORT normkitMpiTargets
         NAMESPACE normkit::
         FILE "${PROJECT_BINARY_DIR}/normkitMpiTargets.cmake")
endif()

# pkg-config: Eigen's include dir comes through "Requires: eigen3" (Debian ships eigen3.pc).
# The prefix is computed from the .pc file's own location, so that `cmake --install --prefix`
# into any directory gives a working file.
if(IS_ABSOLUTE "${NORMKIT_PKGCONFIG_INSTALL_DIR}")
  set(NORMKIT_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH _nk_pc_up "/_nk/${NORMKIT_PKGCONFIG_INSTALL_DIR}" "/_nk")
  string(REGEX REPLACE "/$" "" _nk_pc_up "${_nk_pc_up}")
  set(NORMKIT_PC_PREFIX "\${pcfiledir}/${_nk_pc_up}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(NORMKIT_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(NORMKIT_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file("${CMAKE_CURRENT_LIST_DIR}/normkit.pc.in" "${PROJECT_BINARY_DIR}/normkit.pc" @ONLY)
install(FILES "${PROJECT_BINARY_DIR}/normkit.pc"
        DESTINATION "${NORMKIT_PKGCONFIG_INSTALL_DIR}"
        COMPONENT normkit_Development)
