// Run-time choice among the builds of kernels.cpp: the widest instruction set this CPU
// runs, unless LPNORM_CPU_ISA names another (tests use it to cover every build).
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "cpu/kernels.h"

namespace lpnorm::cpu {

const Kernels& kernels_baseline();
#ifdef LPNORM_HAVE_AVX2
const Kernels& kernels_avx2();
#endif
#ifdef LPNORM_HAVE_AVX512
const Kernels& kernels_avx512();
#endif

namespace {

bool cpu_runs(const std::string& isa) {
  if (isa == "baseline") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

const Kernels* build_named(const std::string& isa) {
  if (isa == "baseline") return &kernels_baseline();
#ifdef LPNORM_HAVE_AVX2
  if (isa == "avx2") return &kernels_avx2();
#endif
#ifdef LPNORM_HAVE_AVX512
  if (isa == "avx512") return &kernels_avx512();
#endif
  return nullptr;
}

const Kernels& checked_build(const std::string& isa) {
  const Kernels* build = build_named(isa);
  if (build == nullptr || !cpu_runs(isa)) {
    std::string choices;
    for (const auto& name : supported_isas()) choices += (choices.empty() ? "" : ", ") + name;
    throw std::invalid_argument("LPNORM_CPU_ISA: '" + isa + "' is not a build this CPU runs (choose from " +
                                choices + ")");
  }
  return *build;
}

const Kernels* initial_choice() {
  if (const char* forced = std::getenv("LPNORM_CPU_ISA"); forced != nullptr && *forced != '\0') {
    return &checked_build(forced);
  }
  return build_named(supported_isas().back());
}

std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> chosen{initial_choice()};
  return chosen;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const char* isa : {"baseline", "avx2", "avx512"}) {
    if (build_named(isa) != nullptr && cpu_runs(isa)) names.emplace_back(isa);
  }
  return names;
}

const Kernels& select_isa(const std::string& isa) {
  const Kernels& build = checked_build(isa);
  current().store(&build);
  return build;
}

const Kernels& kernels() { return *current().load(std::memory_order_relaxed); }

Walk walk_of(const Layout& l) {
  // Contiguous spatial runs go channel by channel; otherwise rows of contiguous channels
  // (channels-last, (N, C)) go row by row; anything else channel by channel, gathering.
  if (l.S > 1 && l.stride_s == 1) return Walk::ChannelMajor;
  if (l.stride_c == 1 && l.C > 1) return Walk::ChannelsInnermost;
  return Walk::ChannelMajor;
}

}  // namespace lpnorm::cpu
