// Splitting work over torch's intra-op threads from this library.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

// at::parallel_for is a header template: with torch's OpenMP backend it forks threads only
// where the including file is compiled with -fopenmp (_OPENMP defined), and runs the whole
// range on the calling thread otherwise. This library is built without -fopenmp, so every
// at::parallel_for here ran on one thread whatever torch.set_num_threads said. Fork torch's
// own OpenMP pool directly instead (GOMP_parallel is what `#pragma omp parallel` compiles
// to; libgomp is loaded with libtorch_cpu); weak, so a build without it runs serially.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#define LPNORM_FORK_GOMP 1
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) __attribute__((weak));
int omp_get_thread_num() __attribute__((weak));
int omp_get_num_threads() __attribute__((weak));
}
#endif

namespace lpnorm::ops {

// at::parallel_for's contract (contiguous ranges of [begin, end), at least `grain` long, one
// per thread, f never called with an empty range), on torch's intra-op threads.
template <typename F>
inline void cpu_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
#if defined(LPNORM_FORK_GOMP)
  if (begin >= end) return;
  const int64_t count = end - begin;
  int64_t threads = at::get_num_threads();
  if (grain > 0) threads = std::min<int64_t>(threads, (count + grain - 1) / grain);
  threads = std::min<int64_t>(threads, count);
  if (GOMP_parallel == nullptr || threads <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  struct Shared {
    const F* f;
    int64_t begin, end, chunk;
    std::atomic<int64_t> next{0};
    std::atomic_flag failed = ATOMIC_FLAG_INIT;
    std::exception_ptr error;
  } shared{&f, begin, end, (count + threads - 1) / threads};
  // Thread i of the team takes chunk i, as torch's OpenMP parallel_for does, so each pass of
  // a call finds the rows it reads in the core that read or wrote them last. (Chunks taken
  // first come first served left (256, 1024) float32 l2 forward+backward at 2 threads 1.10x
  // torch, 0.85-0.92x this way; l1 1.15 -> 0.89-0.98.) A team smaller than asked for shares
  // the chunks past it. Which thread runs which range does not change any result: every tile
  // writes its own outputs.
  GOMP_parallel(
      [](void* data) {
        auto& s = *static_cast<Shared*>(data);
        auto run = [&s](int64_t chunk) {
          const int64_t first = s.begin + chunk * s.chunk;
          if (first >= s.end) return false;
          try {
            (*s.f)(first, std::min(s.end, first + s.chunk));
          } catch (...) {
            if (!s.failed.test_and_set()) s.error = std::current_exception();
          }
          return true;
        };
        const bool numbered = omp_get_thread_num != nullptr && omp_get_num_threads != nullptr;
        const int64_t team = numbered ? omp_get_num_threads() : 0;
        if (numbered) run(omp_get_thread_num());
        while (run(team + s.next.fetch_add(1))) {
        }
      },
      &shared, static_cast<unsigned>(threads), 0);
  if (shared.error) std::rethrow_exception(shared.error);
#else
  at::parallel_for(begin, end, grain, f);
#endif
}

}  // namespace lpnorm::ops
