# pybind11 from pip (the build requirement), found through its own Python module.
# torch/include ships another copy; lpnorm._C never sees torch's include path, so the
# headers found here are the ones compiled.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import pybind11; print(pybind11.get_cmake_dir())"
  OUTPUT_VARIABLE _lpnorm_pybind11_dir
  RESULT_VARIABLE _lpnorm_pybind11_status
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(_lpnorm_pybind11_status EQUAL 0)
  list(APPEND CMAKE_PREFIX_PATH "${_lpnorm_pybind11_dir}")
endif()
set(PYBIND11_FINDPYTHON ON)
find_package(Python REQUIRED COMPONENTS Interpreter Development.Module)
find_package(pybind11 CONFIG REQUIRED)
