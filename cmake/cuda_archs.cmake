# GPTOSS_CUDA_ARCHS: which architectures the CUDA kernels are compiled for.
#   a list of 80, 86, 87, 89, 90a (CMake's CUDA_ARCHITECTURES entries: "86" holds sm_86 machine code
#   and compute_86 PTX; "-real" / "-virtual" keep one of them), e.g. "80;89;90a" for an A100, an
#   L4 / RTX 4090 and an H100 from one build; or
#   auto: the GPUs of this machine (nvidia-smi) plus 90a; 90a alone on a machine without a GPU.
# Hopper's kernels need the arch-specific target 90a (plain 90 cannot compile wgmma). 8.x cards
# run sm_80 machine code too (sm_86 / sm_89 code is tuned for them); devices newer than 9.0 get
# 89, whose PTX their driver compiles (the sm_80..89 paths).
#
# Script mode, for tests: cmake -DARCHS=auto [-DNVIDIA_SMI=path] -P cmake/cuda_archs.cmake

function(gptoss_resolve_cuda_archs in nvidia_smi out)
  string(STRIP "${in}" in)
  if(in STREQUAL "" OR in STREQUAL "auto")
    set(found "")
    if(NOT nvidia_smi)
      find_program(nvidia_smi nvidia-smi)
    endif()
    if(nvidia_smi)
      execute_process(COMMAND "${nvidia_smi}" --query-gpu=compute_cap --format=csv,noheader
                      OUTPUT_VARIABLE caps RESULT_VARIABLE rc ERROR_QUIET TIMEOUT 30)
      if(rc EQUAL 0)
        string(REPLACE "\n" ";" caps "${caps}")
        foreach(cap IN LISTS caps)
          string(STRIP "${cap}" cap)
          if(NOT cap MATCHES "^([0-9]+)\\.([0-9])$")
            continue()
          endif()
          math(EXPR cc "${CMAKE_MATCH_1} * 10 + ${CMAKE_MATCH_2}")
          if(cc LESS 80)
            message(WARNING "gptoss-kernels: a GPU of compute capability ${cap} is below the kernels' minimum (8.0); "
                            "not built for it")
          elseif(cc EQUAL 90)
            list(APPEND found 90a)
          elseif(cc LESS 90)
            list(APPEND found ${cc})
          else()
            message(STATUS "gptoss-kernels: compute capability ${cap}: building 89 (the driver compiles its PTX)")
            list(APPEND found 89)
          endif()
        endforeach()
      endif()
    endif()
    list(APPEND found 90a)
    list(REMOVE_DUPLICATES found)
    list(SORT found COMPARE NATURAL)
    set(in "${found}")
    message(STATUS "gptoss-kernels: GPTOSS_CUDA_ARCHS=auto -> ${in}")
  endif()
  foreach(a IN LISTS in)
    if(NOT a MATCHES "^([0-9]+)(a?)(-real|-virtual)?$")
      message(FATAL_ERROR "gptoss-kernels: GPTOSS_CUDA_ARCHS entry '${a}' is not an architecture like 80, 86, 89 or 90a")
    endif()
    set(num "${CMAKE_MATCH_1}")
    set(spec "${CMAKE_MATCH_2}")
    if(num LESS 80)
      message(FATAL_ERROR "gptoss-kernels: GPTOSS_CUDA_ARCHS entry '${a}': the kernels need sm_80 or newer "
                          "(cp.async, bf16 mma.sync)")
    elseif(num EQUAL 90 AND NOT spec STREQUAL "a")
      message(FATAL_ERROR "gptoss-kernels: GPTOSS_CUDA_ARCHS entry '${a}': Hopper needs the arch-specific target 90a "
                          "(its wgmma kernels do not compile for plain sm_90)")
    elseif(num GREATER 90)
      message(WARNING "gptoss-kernels: GPTOSS_CUDA_ARCHS entry '${a}' is not one of the tested 80, 86, 87, 89, 90a "
                      "(it takes the sm_80..89 paths' wgmma-free code where it lacks sm_90a's)")
    endif()
  endforeach()
  set(${out} "${in}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(NOT DEFINED ARCHS)
    set(ARCHS auto)
  endif()
  if(NOT DEFINED NVIDIA_SMI)
    set(NVIDIA_SMI "")
  endif()
  gptoss_resolve_cuda_archs("${ARCHS}" "${NVIDIA_SMI}" result)
  message("GPTOSS_CUDA_ARCHS=${result}")
endif()
