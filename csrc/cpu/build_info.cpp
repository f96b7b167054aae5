// The compiler and instruction-set line of ptkernels._C.build_info().
#include "ptk_cpu.h"

namespace ptk { namespace cpu {

const char* build_info() {
  return "cpu kernels: C++"
#if defined(__clang__)
         " clang " __clang_version__
#elif defined(__GNUC__)
         " gcc " __VERSION__
#endif
#ifdef _OPENMP
         ", OpenMP"
#else
         ", no OpenMP"
#endif
#if defined(__AVX512F__)
         ", AVX-512"
#elif defined(__AVX2__)
         ", AVX2"
#elif defined(__AVX__)
         ", AVX"
#elif defined(__SSE2__)
         ", SSE2"
#elif defined(__ARM_NEON)
         ", NEON"
#endif
#if defined(__FMA__)
         "+FMA"
#endif
      ;
}

}}  // namespace ptk::cpu
