// Shared helpers of the CPU kernels (csrc/cpu/*.cpp): storage conversions, a vectorizable exp, OpenMP glue.
//
// Everything here is inline so that it vectorizes inside the callers' `#pragma omp simd` loops: GCC does not
// call glibc's vector math (libmvec) without -ffast-math, and -ffast-math would break the NaN / infinity
// semantics the row functions keep, so exp is a polynomial written with plain float arithmetic and integer bit
// manipulation (which the vectorizer handles). fp16 <-> fp32 conversions are likewise branch-free bit tricks
// (the well-known ones of the FP16 library), bf16 is the top half of an fp32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define PTK_INLINE inline __attribute__((always_inline))
#else
#define PTK_INLINE inline
#endif

namespace ptk { namespace cpu {

// dtype codes of the ABI (shared with the CUDA half for 0..2)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Negative return codes of the kernels (>= 0 is a count of bad labels / targets).
enum Status : int64_t { kOk = 0, kBadDType = -1, kBadShape = -2, kBadSegments = -3, kBadOption = -4 };

// ------------------------------------------------------------------------------------------- storage types

struct Half { uint16_t bits; };  // IEEE fp16 storage
struct BF16 { uint16_t bits; };  // bfloat16 storage

PTK_INLINE uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
PTK_INLINE float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

PTK_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // normal numbers (and inf / NaN): move the exponent and mantissa into place, rescale the exponent bias
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // subnormal halves: build 0.5 + m * 2^-24 as a float and subtract the 0.5
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from_bits(r);
}

PTK_INLINE uint16_t float_to_half(float f) {  // round to nearest even, overflow to inf, NaN stays NaN
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

PTK_INLINE float bf16_to_float(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

PTK_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? ((u >> 16) | 0x40u) : rounded);
}

// load<C>(p, j): element j of storage T as compute type C;  store(p, j, v): v rounded into storage T.
template <typename C> PTK_INLINE C load(const float* p, int64_t j) { return static_cast<C>(p[j]); }
template <typename C> PTK_INLINE C load(const double* p, int64_t j) { return static_cast<C>(p[j]); }
template <typename C> PTK_INLINE C load(const Half* p, int64_t j) { return static_cast<C>(half_to_float(p[j].bits)); }
template <typename C> PTK_INLINE C load(const BF16* p, int64_t j) { return static_cast<C>(bf16_to_float(p[j].bits)); }

template <typename C> PTK_INLINE void store(float* p, int64_t j, C v) { p[j] = static_cast<float>(v); }
template <typename C> PTK_INLINE void store(double* p, int64_t j, C v) { p[j] = static_cast<double>(v); }
template <typename C> PTK_INLINE void store(Half* p, int64_t j, C v) { p[j].bits = float_to_half(static_cast<float>(v)); }
template <typename C> PTK_INLINE void store(BF16* p, int64_t j, C v) { p[j].bits = float_to_bf16(static_cast<float>(v)); }

// ----------------------------------------------------------------------------------------------------- exp

// exp(x) in fp32, vectorizable: x = k ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial
// (about 1 ulp), times 2^k through the exponent bits. exp(-inf) = 0, exp(+inf) = inf, exp(NaN) = NaN.
PTK_INLINE float fast_exp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504019f;  // exp(lo) = FLT_MIN: 2^k stays normal
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float kf_m = xc * 1.44269504088896341f + magic;
  const float kf = kf_m - magic;
  const int32_t k = static_cast<int32_t>(f32_bits(kf_m) - f32_bits(magic));
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  float y = f32_from_bits(f32_bits(p) + (static_cast<uint32_t>(k) << 23));
  y = x < lo ? 0.0f : y;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

// fp64 keeps libm's exp: it is the accuracy path (tests, fp64 training), not the fast one.
PTK_INLINE double fast_exp(double x) { return std::exp(x); }

// tanh through exp, vectorizable: tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|).
template <typename C> PTK_INLINE C fast_tanh(C x) {
  const C e = fast_exp(static_cast<C>(-2) * std::fabs(x));
  const C t = (static_cast<C>(1) - e) / (static_cast<C>(1) + e);
  return x < 0 ? -t : t;
}

// --------------------------------------------------------------------------------------------------- OpenMP

PTK_INLINE int threads_for(int requested, int64_t work_items, int64_t work_per_item, int64_t grain = 1 << 15) {
  // One thread unless there is enough work to pay for waking the pool (about 32k elements per thread).
  if (requested <= 1) return 1;
  const int64_t total = work_items * (work_per_item > 0 ? work_per_item : 1);
  int64_t by_work = total / grain;
  if (by_work < 1) by_work = 1;
  if (by_work > work_items) by_work = work_items;
  return static_cast<int>(by_work < requested ? by_work : requested);
}

}}  // namespace ptk::cpu
