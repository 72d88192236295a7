# The LPNORM_CUDA decision. AUTO builds the CUDA kernels only when nvcc and a CUDA build of
# torch are both present; ON insists on them; OFF skips CUDA. Says what it chose in one line.
# Sets LPNORM_WITH_CUDA (ON/OFF) and, with CUDA, CMAKE_CUDA_ARCHITECTURES.
set(LPNORM_CUDA "AUTO" CACHE STRING "Build the CUDA kernels: AUTO, ON or OFF")
set_property(CACHE LPNORM_CUDA PROPERTY STRINGS AUTO ON OFF)

set(LPNORM_WITH_CUDA OFF)
set(_lpnorm_cuda_reason "LPNORM_CUDA=OFF")
if(NOT LPNORM_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_lpnorm_cuda_reason "no nvcc found")
  elseif(LPNORM_TORCH_CUDA_VERSION STREQUAL "")
    set(_lpnorm_cuda_reason "torch ${LPNORM_TORCH_VERSION} is a CPU build")
  else()
    set(LPNORM_WITH_CUDA ON)
  endif()
endif()

if(LPNORM_CUDA STREQUAL "ON" AND NOT LPNORM_WITH_CUDA)
  message(FATAL_ERROR "lpnorm: LPNORM_CUDA=ON but ${_lpnorm_cuda_reason}")
endif()

if(LPNORM_WITH_CUDA)
  # Architectures: LPNORM_CUDA_ARCHITECTURES (a CMake list, "80-real;90-real;90-virtual"),
  # else TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX" or "8.0 9.0+PTX"), else sm_70 (CUDA < 13) or
  # sm_75 (CUDA 13, which no longer compiles for Volta) to sm_90, plus PTX for newer GPUs.
  if(NOT LPNORM_CUDA_ARCHITECTURES AND DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    string(REPLACE " " ";" _lpnorm_archs "$ENV{TORCH_CUDA_ARCH_LIST}")
    set(LPNORM_CUDA_ARCHITECTURES "")
    foreach(_arch IN LISTS _lpnorm_archs)
      string(REPLACE "+PTX" "" _plain "${_arch}")
      string(REPLACE "." "" _plain "${_plain}")
      if(_arch MATCHES "\\+PTX$")
        list(APPEND LPNORM_CUDA_ARCHITECTURES "${_plain}-real" "${_plain}-virtual")
      else()
        list(APPEND LPNORM_CUDA_ARCHITECTURES "${_plain}-real")
      endif()
    endforeach()
  endif()
  if(LPNORM_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "${LPNORM_CUDA_ARCHITECTURES}")
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  # A CUDA torch's find_package(Torch) (torch.cmake, before this file) appends its own
  # -gencode flags (from TORCH_CUDA_ARCH_LIST, or the GPUs it sees) to CMAKE_CUDA_FLAGS and
  # turns CMAKE_CUDA_ARCHITECTURES off; drop them so the list chosen here decides alone.
  string(REGEX REPLACE "-gencode[ =]+arch=[^ ]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  if(NOT LPNORM_CUDA_ARCHITECTURES)
    # Volta (sm_70) to Hopper (sm_90) plus PTX; CUDA 13 dropped Volta, so it starts at sm_75.
    set(LPNORM_CUDA_ARCHITECTURES "75-real;80-real;86-real;89-real;90-real;90-virtual")
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 13)
      list(PREPEND LPNORM_CUDA_ARCHITECTURES "70-real")
    endif()
    set(CMAKE_CUDA_ARCHITECTURES "${LPNORM_CUDA_ARCHITECTURES}")
  endif()
  message(STATUS "lpnorm: CUDA ON (torch CUDA ${LPNORM_TORCH_CUDA_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "lpnorm: CUDA OFF (${_lpnorm_cuda_reason})")
endif()
