# Finds the installed PyTorch through the Python interpreter that builds us, so the
# extension is compiled against exactly the torch it will be imported with.
# Sets: Torch targets (find_package), LPNORM_TORCH_VERSION, LPNORM_TORCH_CUDA_VERSION,
# LPNORM_TORCH_CXX11_ABI.
find_package(Python REQUIRED COMPONENTS Interpreter)

# One interpreter start (importing torch takes seconds): ask for everything at once.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(torch.version.cuda or ''); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _lpnorm_torch_probe
  RESULT_VARIABLE _lpnorm_torch_status
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _lpnorm_torch_status EQUAL 0)
  message(FATAL_ERROR "lpnorm: cannot import torch with ${Python_EXECUTABLE}; install torch first "
                      "(pip install torch==2.13.0) and build with --no-build-isolation")
endif()
string(REPLACE "\n" ";" _lpnorm_torch_probe "${_lpnorm_torch_probe}")
list(GET _lpnorm_torch_probe 0 _lpnorm_torch_prefix)
list(GET _lpnorm_torch_probe 1 LPNORM_TORCH_VERSION)
list(GET _lpnorm_torch_probe 2 LPNORM_TORCH_CUDA_VERSION)
list(GET _lpnorm_torch_probe 3 LPNORM_TORCH_CXX11_ABI)
list(APPEND CMAKE_PREFIX_PATH "${_lpnorm_torch_prefix}")

# A CUDA build of torch insists on a CUDA toolkit inside find_package(Torch); a CPU-only
# build of lpnorm therefore needs a +cpu torch or a toolkit on the PATH.
find_package(Torch REQUIRED)
