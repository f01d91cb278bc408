// Helpers shared by the sparselayers op sources.

#ifndef SPARSELAYERS_COMMON_H_
#define SPARSELAYERS_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace sparselayers {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace si = ::tensorflow::shape_inference;

// One 64-byte vector of T (GCC and Clang vector extensions): a zmm
// register with AVX-512, two ymm with AVX2.
// (A dependent alias would drop the attribute: one typedef per type.)
template <typename T>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Vector = typename VectorOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename T>
Vector<T> Load(const T* p) {
  Vector<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
void Store(T* p, const Vector<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// The sum of v's lanes.
template <typename T>
T LaneSum(const Vector<T>& v) {
  T total = 0;
  for (int64_t i = 0; i < kLanes<T>; ++i) total += v[i];
  return total;
}

#ifdef __AVX512F__
template <>
inline float LaneSum<float>(const Vector<float>& v) {
  return _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(v));
}
template <>
inline double LaneSum<double>(const Vector<double>& v) {
  return _mm512_reduce_add_pd(reinterpret_cast<const __m512d&>(v));
}
#endif

// sum_k a[k] * b[k], k < n.
template <typename T>
T Dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

// Splits units [0, units) over TF's intra-op thread pool; `cost` is the
// estimated cycles of one unit.
template <typename Fn>
void ForUnits(::tensorflow::OpKernelContext* context, int64_t units, int64_t cost, Fn fn) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers->num_threads, workers->workers, units, std::max<int64_t>(cost, 1), fn);
}

}  // namespace sparselayers

#endif  // SPARSELAYERS_COMMON_H_
