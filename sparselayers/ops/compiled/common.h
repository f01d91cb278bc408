// Helpers shared by the sparselayers op sources.

#ifndef SPARSELAYERS_COMMON_H_
#define SPARSELAYERS_COMMON_H_

#include <algorithm>
#include <cstdint>

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

// Splits units [0, units) over TF's intra-op thread pool; `cost` is the
// estimated cycles of one unit.
template <typename Fn>
void ForUnits(::tensorflow::OpKernelContext* context, int64_t units, int64_t cost, Fn fn) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers->num_threads, workers->workers, units, std::max<int64_t>(cost, 1), fn);
}

}  // namespace sparselayers

#endif  // SPARSELAYERS_COMMON_H_
