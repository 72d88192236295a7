// lpnorm._C: what is not an operator. Build facts, the CPU instruction set in use, and the
// scale constants of the core (for tests and curious users). No torch headers: the
// operators live in liblpnorm_ops, which this module links.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "core/constants.h"
#include "cpu/kernels.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = LPNORM_VERSION;
  info["torch_version"] = LPNORM_TORCH_VERSION;
  info["cuda"] = LPNORM_WITH_CUDA != 0;
  info["cuda_version"] = LPNORM_CUDA_VERSION;
  info["cuda_archs"] = LPNORM_CUDA_ARCHS;
  info["cpu_isa"] = lpnorm::cpu::kernels().isa;
  info["cpu_isas"] = lpnorm::cpu::supported_isas();
  info["compiler"] = LPNORM_COMPILER;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lpnorm build information, CPU instruction set choice, scale constants";
  m.def("build_info", &build_info, "Versions and capabilities of this build.");
  m.def("cpu_isa", [] { return std::string(lpnorm::cpu::kernels().isa); },
        "The instruction-set build of the CPU kernels in use.");
  m.def("supported_cpu_isas", &lpnorm::cpu::supported_isas, "The builds this CPU can run, baseline first.");
  m.def("set_cpu_isa", [](const std::string& isa) { return std::string(lpnorm::cpu::select_isa(isa).isa); },
        py::arg("isa"), "Use the named build (baseline, avx2, avx512) from now on.");
  m.def("expected_max_abs", &lpnorm::core::expected_max_abs, py::arg("m"),
        "E[max of m i.i.d. |z|], z ~ N(0, 1).");
  m.def("expected_topk_abs", &lpnorm::core::expected_topk_abs, py::arg("m"), py::arg("k"),
        "E[mean of the k largest of m i.i.d. |z|].");
  m.def("expected_range", &lpnorm::core::expected_range, py::arg("n"), "E[max - min of n i.i.d. z].");
  m.def("lp_consistency", &lpnorm::core::lp_consistency, py::arg("p"), "c_p = (E|z|^p)^(1/p).");
  m.def("paper_linf_multiplier", &lpnorm::core::paper_linf_multiplier, py::arg("m"),
        "0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln m), the authors' L-inf multiplier.");
}
