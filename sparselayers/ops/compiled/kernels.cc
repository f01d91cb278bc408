// Fused CPU kernels for sparselayers, built on first use against the
// installed TensorFlow (sparselayers/ops/compiled/build.py).
//
// Both ops work on transposed operands, (rows, batch) row-major, so that
// every inner loop runs over `batch` contiguous numbers the compiler
// vectorises, and one row of an operand, read once per pattern row, stays
// in L1 while the row's entries reuse it.
//
// SparselayersRowAxpy:    out_t[r, :] = sum_{s in row r} values[order[s]] * src_t[index[s], :]
//   (x @ W and dy @ W.T, with the pattern's entries grouped by output row)
// SparselayersSampledDot: out[s] = dot(a_t[r, :], b_t[index[s], :]) for s in row r
//   (the values gradient sum_b x[b, i] * dy[b, j], in CSR order)

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

#include "common.h"

namespace sparselayers {

REGISTER_OP("SparselayersRowAxpy")
    .Input("src_t: T")
    .Input("values: T")
    .Input("pointers: int64")
    .Input("index: int32")
    .Input("order: int32")
    .Output("out_t: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](si::InferenceContext* c) {
      si::DimensionHandle rows;
      TF_RETURN_IF_ERROR(c->Subtract(c->Dim(c->input(2), 0), 1, &rows));
      c->set_output(0, c->Matrix(rows, c->Dim(c->input(0), 1)));
      return absl::OkStatus();
    });

REGISTER_OP("SparselayersSampledDot")
    .Input("a_t: T")
    .Input("b_t: T")
    .Input("pointers: int64")
    .Input("index: int32")
    .Output("out: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->Vector(c->Dim(c->input(3), 0)));
      return absl::OkStatus();
    });

namespace {

template <typename T>
void Axpy(T* __restrict out, const T* __restrict src, T v, int64_t n) {
#pragma omp simd
  for (int64_t b = 0; b < n; ++b) out[b] += v * src[b];
}

template <typename T>
void Axpy4(T* __restrict out, const T* __restrict s0, const T* __restrict s1, const T* __restrict s2,
           const T* __restrict s3, T v0, T v1, T v2, T v3, int64_t n) {
#pragma omp simd
  for (int64_t b = 0; b < n; ++b) out[b] += v0 * s0[b] + v1 * s1[b] + v2 * s2[b] + v3 * s3[b];
}

template <typename T>
void Dot4(const T* __restrict a, const T* __restrict b0, const T* __restrict b1, const T* __restrict b2,
          const T* __restrict b3, int64_t n, T* out) {
  T acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
#pragma omp simd reduction(+ : acc0, acc1, acc2, acc3)
  for (int64_t k = 0; k < n; ++k) {
    const T x = a[k];
    acc0 += x * b0[k];
    acc1 += x * b1[k];
    acc2 += x * b2[k];
    acc3 += x * b3[k];
  }
  out[0] = acc0;
  out[1] = acc1;
  out[2] = acc2;
  out[3] = acc3;
}

absl::Status CheckPattern(const Tensor& pointers, const Tensor& index, int64_t source_rows) {
  if (pointers.dims() != 1 || pointers.NumElements() < 1 || index.dims() != 1) {
    return absl::InvalidArgumentError("pointers and index must be vectors, pointers non-empty");
  }
  const auto p = pointers.flat<int64_t>();
  const int64_t rows = pointers.NumElements() - 1;
  if (p(0) != 0 || p(rows) != index.NumElements()) {
    return absl::InvalidArgumentError("pointers must run from 0 to the number of entries");
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (p(r + 1) < p(r)) return absl::InvalidArgumentError("pointers must not decrease");
  }
  const auto idx = index.flat<int32_t>();
  for (int64_t s = 0; s < index.NumElements(); ++s) {
    if (idx(s) < 0 || idx(s) >= source_rows) return absl::InvalidArgumentError(absl::StrCat("index out of range at ", s));
  }
  return absl::OkStatus();
}

}  // namespace

template <typename T>
class RowAxpyOp : public OpKernel {
 public:
  explicit RowAxpyOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& src_t = context->input(0);
    const Tensor& values = context->input(1);
    const Tensor& pointers = context->input(2);
    const Tensor& index = context->input(3);
    const Tensor& order = context->input(4);
    OP_REQUIRES(context, src_t.dims() == 2, absl::InvalidArgumentError("src_t must be a matrix"));
    OP_REQUIRES_OK(context, CheckPattern(pointers, index, src_t.dim_size(0)));
    const int64_t nnz = index.NumElements();
    OP_REQUIRES(context, values.NumElements() == nnz, absl::InvalidArgumentError("values must have one entry per index"));
    const bool permuted = order.NumElements() > 0;
    OP_REQUIRES(context, !permuted || order.NumElements() == nnz,
                absl::InvalidArgumentError("order must be empty or have one entry per index"));
    if (permuted) {
      const auto o = order.flat<int32_t>();
      for (int64_t s = 0; s < nnz; ++s) {
        OP_REQUIRES(context, o(s) >= 0 && o(s) < nnz, absl::InvalidArgumentError(absl::StrCat("order out of range at ", s)));
      }
    }
    const int64_t rows = pointers.NumElements() - 1;
    const int64_t batch = src_t.dim_size(1);
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows, batch}), &out_t));
    const T* src = src_t.flat<T>().data();
    const T* v = values.flat<T>().data();
    const int64_t* p = pointers.flat<int64_t>().data();
    const int32_t* idx = index.flat<int32_t>().data();
    const int32_t* ord = permuted ? order.flat<int32_t>().data() : nullptr;
    T* out = out_t->flat<T>().data();
    const int64_t cost = (rows ? nnz / rows + 1 : 1) * (batch + 1);
    ForUnits(context, rows, cost, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        T* o = out + r * batch;
        std::fill(o, o + batch, T(0));
        int64_t s = p[r];
        const int64_t end = p[r + 1];
        auto value = [&](int64_t k) { return v[ord ? ord[k] : k]; };
        for (; s + 4 <= end; s += 4) {
          Axpy4(o, src + idx[s] * batch, src + idx[s + 1] * batch, src + idx[s + 2] * batch,
                src + idx[s + 3] * batch, value(s), value(s + 1), value(s + 2), value(s + 3), batch);
        }
        for (; s < end; ++s) Axpy(o, src + idx[s] * batch, value(s), batch);
      }
    });
  }
};

template <typename T>
class SampledDotOp : public OpKernel {
 public:
  explicit SampledDotOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& a_t = context->input(0);
    const Tensor& b_t = context->input(1);
    const Tensor& pointers = context->input(2);
    const Tensor& index = context->input(3);
    OP_REQUIRES(context, a_t.dims() == 2 && b_t.dims() == 2, absl::InvalidArgumentError("a_t and b_t must be matrices"));
    OP_REQUIRES(context, a_t.dim_size(1) == b_t.dim_size(1), absl::InvalidArgumentError("a_t and b_t must share the batch"));
    OP_REQUIRES(context, pointers.NumElements() == a_t.dim_size(0) + 1,
                absl::InvalidArgumentError("pointers must have one entry per row of a_t, plus one"));
    OP_REQUIRES_OK(context, CheckPattern(pointers, index, b_t.dim_size(0)));
    const int64_t nnz = index.NumElements();
    const int64_t rows = a_t.dim_size(0);
    const int64_t batch = a_t.dim_size(1);
    Tensor* out_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({nnz}), &out_tensor));
    const T* a = a_t.flat<T>().data();
    const T* b = b_t.flat<T>().data();
    const int64_t* p = pointers.flat<int64_t>().data();
    const int32_t* idx = index.flat<int32_t>().data();
    T* out = out_tensor->flat<T>().data();
    const int64_t cost = (rows ? nnz / rows + 1 : 1) * (batch + 1);
    ForUnits(context, rows, cost, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const T* x = a + r * batch;
        int64_t s = p[r];
        const int64_t end = p[r + 1];
        for (; s + 4 <= end; s += 4) {
          Dot4(x, b + idx[s] * batch, b + idx[s + 1] * batch, b + idx[s + 2] * batch, b + idx[s + 3] * batch,
               batch, out + s);
        }
        for (; s < end; ++s) out[s] = Dot(x, b + idx[s] * batch, batch);
      }
    });
  }
};

#define SPARSELAYERS_REGISTER(T)                                                                     \
  REGISTER_KERNEL_BUILDER(                                                                           \
      Name("SparselayersRowAxpy").Device(DEVICE_CPU).TypeConstraint<T>("T"), RowAxpyOp<T>);         \
  REGISTER_KERNEL_BUILDER(                                                                           \
      Name("SparselayersSampledDot").Device(DEVICE_CPU).TypeConstraint<T>("T"), SampledDotOp<T>);

SPARSELAYERS_REGISTER(float)
SPARSELAYERS_REGISTER(double)

}  // namespace sparselayers
