# The host-simulation build (csrc/hostsim/README.md): every csrc/kernels/*.cu compiled by the host
# C++ compiler as device code (__CUDA_ARCH__ = 900, GPTOSS_HOSTSIM), with -fsanitize=thread
# instrumentation whose callbacks are the checkers in runtime.cpp (no sanitizer runtime is linked).
#   libgptoss_kernels_hostsim.so  - the same C ABI (gptoss.h), kernels run on the CPU
#   gptoss_kernels._hostsim       - the same bindings as _C over it, plus the runner's controls
set(GPTOSS_HS_DIR "${CMAKE_CURRENT_SOURCE_DIR}/csrc/hostsim")
if(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64" OR NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  message(WARNING "gptoss-kernels: the host-simulation build needs GCC on x86-64; skipped")
  set(GPTOSS_HOSTSIM_PY False)
  return()
endif()
set(GPTOSS_HOSTSIM_PY True)

file(GLOB GPTOSS_HS_KERNEL_FILES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/*.cu")
set(GPTOSS_HS_KERNEL_TUS "")
foreach(cu ${GPTOSS_HS_KERNEL_FILES})
  get_filename_component(name "${cu}" NAME_WE)
  set(tu "${CMAKE_CURRENT_BINARY_DIR}/hostsim/${name}.cpp")
  file(CONFIGURE OUTPUT "${tu}" CONTENT "// generated: ${name}.cu compiled for the host simulation\n#include \"${cu}\"\n" @ONLY)
  list(APPEND GPTOSS_HS_KERNEL_TUS "${tu}")
endforeach()
list(APPEND GPTOSS_HS_KERNEL_TUS "${GPTOSS_HS_DIR}/probes.cpp")

# Device code: instrumented loads/stores, no FMA contraction (the _rn intrinsics stay two
# roundings), no strict aliasing (bit casts through pointers).
set(GPTOSS_HS_DEVICE_FLAGS -O2 -fsanitize=thread --param=tsan-instrument-func-entry-exit=0
    -ffp-contract=off -fno-strict-aliasing -D__CUDACC__ -D__CUDA_ARCH__=900)
set_source_files_properties(${GPTOSS_HS_KERNEL_TUS} PROPERTIES COMPILE_OPTIONS "${GPTOSS_HS_DEVICE_FLAGS}")
# the runtime is on every emulated access's path: optimized whatever the build type
set_source_files_properties("${GPTOSS_HS_DIR}/runtime.cpp" PROPERTIES COMPILE_OPTIONS "-O2")

add_library(gptoss_kernels_hostsim SHARED ${GPTOSS_HS_KERNEL_TUS} "${GPTOSS_HS_DIR}/runtime.cpp"
            "${GPTOSS_HS_DIR}/switch_x86_64.S")
target_include_directories(gptoss_kernels_hostsim BEFORE PRIVATE "${GPTOSS_HS_DIR}/include"
                           "${CMAKE_CURRENT_SOURCE_DIR}/csrc" "${CMAKE_CURRENT_SOURCE_DIR}/csrc/include" "${GPTOSS_HS_DIR}")
target_compile_definitions(gptoss_kernels_hostsim PRIVATE GPTOSS_HOSTSIM=1 GPTOSS_BUILDING_LIBRARY=1
                           GPTOSS_CUDA_ARCHS_STR="hostsim")
target_link_libraries(gptoss_kernels_hostsim PRIVATE ${CMAKE_DL_LIBS})

pybind11_add_module(_hostsim MODULE ${GPTOSS_BINDING_SOURCES} "${GPTOSS_HS_DIR}/bind_hostsim.cpp")
target_include_directories(_hostsim BEFORE PRIVATE "${GPTOSS_HS_DIR}/include" "${CMAKE_CURRENT_SOURCE_DIR}/csrc"
                           "${CMAKE_CURRENT_SOURCE_DIR}/csrc/include")
target_compile_definitions(_hostsim PRIVATE GPTOSS_HOSTSIM=1 GPTOSS_MODULE_NAME=_hostsim)
target_link_libraries(_hostsim PRIVATE gptoss_kernels_hostsim)
set_target_properties(_hostsim PROPERTIES INSTALL_RPATH "$ORIGIN" BUILD_WITH_INSTALL_RPATH OFF)
install(TARGETS _hostsim gptoss_kernels_hostsim LIBRARY DESTINATION .)
