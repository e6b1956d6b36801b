# `cmake --install`: lib/libmiss_ext.so, the C++ API headers under include/miss_ext/ (miss_ext.h
# and every header it includes, same relative layout), and a package config so that a C++
# project can find_package(miss_ext) and link miss_ext::miss_ext.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(MISS_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/miss_ext")

install(TARGETS miss_ext EXPORT miss_extTargets
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}"
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}")

# The closure of miss_ext.h's includes, listed rather than globbed so that kernel-private headers
# stay private; the consumer build in ctest (examples/cpp against this install) fails if one is
# missing.
set(MISS_PUBLIC_HEADERS
  miss_ext.h
  ops/fold.h ops/linear.h ops/merge.h ops/bat.h ops/bank.h ops/bank_fold.h ops/kernels.h
  ops/common/bf16_parts.h ops/common/dropout_mask.h ops/common/host_device.h)
foreach(_header IN LISTS MISS_PUBLIC_HEADERS)
  get_filename_component(_dir "${_header}" DIRECTORY)
  install(FILES "csrc/${_header}" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/miss_ext/${_dir}")
endforeach()

install(EXPORT miss_extTargets NAMESPACE miss_ext:: DESTINATION "${MISS_INSTALL_CMAKEDIR}")
configure_package_config_file(cmake/miss_extConfig.cmake.in
  "${CMAKE_CURRENT_BINARY_DIR}/miss_extConfig.cmake" INSTALL_DESTINATION "${MISS_INSTALL_CMAKEDIR}")
# A custom op library must match its torch exactly; the version check is only the package's own.
write_basic_package_version_file("${CMAKE_CURRENT_BINARY_DIR}/miss_extConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/miss_extConfig.cmake" "${CMAKE_CURRENT_BINARY_DIR}/miss_extConfigVersion.cmake"
  DESTINATION "${MISS_INSTALL_CMAKEDIR}")

# find_package(miss_ext) runs torch's CMake config, which looks for the CUDA toolkit and the
# architectures (see CMakeLists.txt): the config reuses the same two helpers.
install(FILES cmake/MissCudaToolkit.cmake cmake/MissCudaArchs.cmake DESTINATION "${MISS_INSTALL_CMAKEDIR}")
