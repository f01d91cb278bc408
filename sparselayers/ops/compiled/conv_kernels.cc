// Direct sparse convolution for sparselayers (Park et al., ICLR 2017):
// products that read the image in place, shifted per kernel tap, instead of
// a patch matrix prod(kernel_size) times the size of the input.
//
// The image is laid out channel by channel, (channels, positions) with the
// positions of the padded images one after the other (batch, *spatial, C
// order): a kernel tap at a stride-1 output position i reads input position
// i + shift, shift = sum_a offset_a * dilation_a * stride of axis a. So both
// ops are the row products of kernels.cc with one shift per pattern entry,
// and every inner loop runs over contiguous positions.
//
// SparselayersShiftAxpy: out[r, i] = sum_{s in row r} values[order[s]] * src[index[s], i + shift[s]],
//                        i in [0, length)  (the convolution and its input gradient)
// SparselayersShiftDot:  out[order[s]] = sum_i a[r, i] * b[index[s], i + shift[s]], s in row r
//                        (the values gradient)

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

#include "common.h"

namespace sparselayers {

REGISTER_OP("SparselayersShiftAxpy")
    .Input("src: T")
    .Input("values: T")
    .Input("pointers: int64")
    .Input("index: int32")
    .Input("shift: int32")
    .Input("order: int32")
    .Input("length: int64")
    .Output("out: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](si::InferenceContext* c) {
      si::DimensionHandle rows, length;
      TF_RETURN_IF_ERROR(c->Subtract(c->Dim(c->input(2), 0), 1, &rows));
      TF_RETURN_IF_ERROR(c->MakeDimForScalarInput(6, &length));
      c->set_output(0, c->Matrix(rows, length));
      return absl::OkStatus();
    });

REGISTER_OP("SparselayersShiftDot")
    .Input("a: T")
    .Input("b: T")
    .Input("pointers: int64")
    .Input("index: int32")
    .Input("shift: int32")
    .Input("order: int32")
    .Output("out: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->Vector(c->Dim(c->input(3), 0)));
      return absl::OkStatus();
    });

namespace {

// Output positions one register tile holds: its accumulators stay in
// registers while every entry of the row adds its shifted source.
constexpr int64_t kTile = 64;
// Bytes of source positions (all source rows) one block of work reads: the
// block stays in L2 while every output row reuses it.
constexpr int64_t kBlockBytes = 512 * 1024;

template <typename T>
int64_t BlockLength(int64_t source_rows) {
  const int64_t fit = kBlockBytes / (static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(source_rows, 1));
  return std::clamp<int64_t>(fit / kTile * kTile, kTile, 64 * kTile);
}

// Checks the entry table against a (rows + 1)-pointer CSR, `source_rows`
// rows of `source_length` positions read over [shift, shift + length).
absl::Status CheckTable(const Tensor& pointers, const Tensor& index, const Tensor& shift, const Tensor& order,
                        int64_t source_rows, int64_t source_length, int64_t length) {
  if (pointers.dims() != 1 || pointers.NumElements() < 1 || index.dims() != 1 || shift.dims() != 1 ||
      order.dims() != 1) {
    return absl::InvalidArgumentError("pointers, index, shift and order must be vectors, pointers non-empty");
  }
  const int64_t nnz = index.NumElements();
  if (shift.NumElements() != nnz) return absl::InvalidArgumentError("shift must have one entry per index");
  if (order.NumElements() != 0 && order.NumElements() != nnz) {
    return absl::InvalidArgumentError("order must be empty or have one entry per index");
  }
  const auto p = pointers.flat<int64_t>();
  const int64_t rows = pointers.NumElements() - 1;
  if (p(0) != 0 || p(rows) != nnz) return absl::InvalidArgumentError("pointers must run from 0 to the number of entries");
  for (int64_t r = 0; r < rows; ++r) {
    if (p(r + 1) < p(r)) return absl::InvalidArgumentError("pointers must not decrease");
  }
  const auto idx = index.flat<int32_t>();
  const auto sh = shift.flat<int32_t>();
  for (int64_t s = 0; s < nnz; ++s) {
    if (idx(s) < 0 || idx(s) >= source_rows) return absl::InvalidArgumentError(absl::StrCat("index out of range at ", s));
    if (sh(s) < 0 || sh(s) + length > source_length) {
      return absl::InvalidArgumentError(absl::StrCat("shift reads outside the source at ", s));
    }
  }
  const auto o = order.flat<int32_t>();
  for (int64_t s = 0; s < order.NumElements(); ++s) {
    if (o(s) < 0 || o(s) >= nnz) return absl::InvalidArgumentError(absl::StrCat("order out of range at ", s));
  }
  return absl::OkStatus();
}

// Where each entry's source starts: row index[s], position shift[s].
std::vector<int64_t> SourceOffsets(const Tensor& index, const Tensor& shift, int64_t source_length) {
  const auto idx = index.flat<int32_t>();
  const auto sh = shift.flat<int32_t>();
  std::vector<int64_t> offsets(idx.size());
  for (int64_t s = 0; s < idx.size(); ++s) offsets[s] = idx(s) * source_length + sh(s);
  return offsets;
}

template <typename T, int64_t N>
void AddTile(T* __restrict out, const T* __restrict src, const int64_t* __restrict offset, const T* __restrict value,
             int64_t first, int64_t end) {
  T acc[N] = {};
  for (int64_t s = first; s < end; ++s) {
    const T v = value[s];
    const T* __restrict x = src + offset[s];
#pragma omp simd
    for (int64_t k = 0; k < N; ++k) acc[k] += v * x[k];
  }
  std::copy(acc, acc + N, out);
}

template <typename T>
void AddEdge(T* __restrict out, const T* __restrict src, const int64_t* __restrict offset, const T* __restrict value,
             int64_t first, int64_t end, int64_t n) {
  std::fill(out, out + n, T(0));
  for (int64_t s = first; s < end; ++s) {
    const T v = value[s];
    const T* __restrict x = src + offset[s];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] += v * x[k];
  }
}

template <typename T>
T Dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
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
  out[0] += acc0;
  out[1] += acc1;
  out[2] += acc2;
  out[3] += acc3;
}

}  // namespace

template <typename T>
class ShiftAxpyOp : public OpKernel {
 public:
  explicit ShiftAxpyOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& src_tensor = context->input(0);
    const Tensor& values = context->input(1);
    const Tensor& pointers = context->input(2);
    const Tensor& index = context->input(3);
    const Tensor& shift = context->input(4);
    const Tensor& order = context->input(5);
    const Tensor& length_tensor = context->input(6);
    OP_REQUIRES(context, src_tensor.dims() == 2, absl::InvalidArgumentError("src must be a matrix"));
    OP_REQUIRES(context, length_tensor.dims() == 0, absl::InvalidArgumentError("length must be a scalar"));
    const int64_t length = length_tensor.scalar<int64_t>()();
    OP_REQUIRES(context, length >= 0, absl::InvalidArgumentError("length must not be negative"));
    const int64_t source_length = src_tensor.dim_size(1);
    OP_REQUIRES_OK(context, CheckTable(pointers, index, shift, order, src_tensor.dim_size(0), source_length, length));
    const int64_t nnz = index.NumElements();
    OP_REQUIRES(context, values.NumElements() == nnz, absl::InvalidArgumentError("values must have one entry per index"));
    const int64_t rows = pointers.NumElements() - 1;
    Tensor* out_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows, length}), &out_tensor));
    if (rows == 0 || length == 0) return;
    // The values in entry order, so that the inner loop reads one array.
    std::vector<T> value(nnz);
    const T* v = values.flat<T>().data();
    const int32_t* ord = order.NumElements() ? order.flat<int32_t>().data() : nullptr;
    for (int64_t s = 0; s < nnz; ++s) value[s] = v[ord ? ord[s] : s];
    const std::vector<int64_t> offset = SourceOffsets(index, shift, source_length);
    const T* src = src_tensor.flat<T>().data();
    const int64_t* p = pointers.flat<int64_t>().data();
    T* out = out_tensor->flat<T>().data();
    const int64_t block = BlockLength<T>(src_tensor.dim_size(0));
    const int64_t blocks = (length + block - 1) / block;
    // Units are blocks of positions: each reads its block of every source
    // row once into cache, and every output row reuses it.
    ForUnits(context, blocks, (nnz + rows) * block, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t begin = b * block, end = std::min(length, begin + block);
        for (int64_t r = 0; r < rows; ++r) {
          T* o = out + r * length;
          int64_t i = begin;
          for (; i + kTile <= end; i += kTile) AddTile<T, kTile>(o + i, src + i, offset.data(), value.data(), p[r], p[r + 1]);
          if (i < end) AddEdge<T>(o + i, src + i, offset.data(), value.data(), p[r], p[r + 1], end - i);
        }
      }
    });
  }
};

template <typename T>
class ShiftDotOp : public OpKernel {
 public:
  explicit ShiftDotOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& a_tensor = context->input(0);
    const Tensor& b_tensor = context->input(1);
    const Tensor& pointers = context->input(2);
    const Tensor& index = context->input(3);
    const Tensor& shift = context->input(4);
    const Tensor& order = context->input(5);
    OP_REQUIRES(context, a_tensor.dims() == 2 && b_tensor.dims() == 2, absl::InvalidArgumentError("a and b must be matrices"));
    OP_REQUIRES(context, pointers.NumElements() == a_tensor.dim_size(0) + 1,
                absl::InvalidArgumentError("pointers must have one entry per row of a, plus one"));
    const int64_t length = a_tensor.dim_size(1);
    const int64_t source_length = b_tensor.dim_size(1);
    OP_REQUIRES_OK(context, CheckTable(pointers, index, shift, order, b_tensor.dim_size(0), source_length, length));
    const int64_t nnz = index.NumElements();
    const int64_t rows = a_tensor.dim_size(0);
    Tensor* out_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({nnz}), &out_tensor));
    T* out = out_tensor->flat<T>().data();
    std::fill(out, out + nnz, T(0));
    if (nnz == 0 || length == 0) return;
    const std::vector<int64_t> offset = SourceOffsets(index, shift, source_length);
    const T* a = a_tensor.flat<T>().data();
    const T* b = b_tensor.flat<T>().data();
    const int64_t* p = pointers.flat<int64_t>().data();
    const int64_t block = BlockLength<T>(rows + b_tensor.dim_size(0));
    // Parts of the positions run in parallel, each summing into its own
    // row of partial sums (block by block, for the cache), added up after.
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((length + block - 1) / block, 4 * workers->num_threads));
    const int64_t per_part = (length + parts - 1) / parts;
    std::vector<T> partial(parts * nnz, T(0));
    ForUnits(context, parts, (nnz + rows) * per_part, [&](int64_t first, int64_t last) {
      for (int64_t part = first; part < last; ++part) {
        T* sums = partial.data() + part * nnz;
        const int64_t part_end = std::min(length, (part + 1) * per_part);
        for (int64_t begin = part * per_part; begin < part_end; begin += block) {
          const int64_t n = std::min(block, part_end - begin);
          for (int64_t r = 0; r < rows; ++r) {
            const T* x = a + r * length + begin;
            const T* y = b + begin;
            int64_t s = p[r];
            const int64_t end = p[r + 1];
            for (; s + 4 <= end; s += 4) {
              Dot4(x, y + offset[s], y + offset[s + 1], y + offset[s + 2], y + offset[s + 3], n, sums + s);
            }
            for (; s < end; ++s) sums[s] += Dot(x, y + offset[s], n);
          }
        }
      }
    });
    const int32_t* ord = order.NumElements() ? order.flat<int32_t>().data() : nullptr;
    for (int64_t s = 0; s < nnz; ++s) {
      T total = 0;
      for (int64_t part = 0; part < parts; ++part) total += partial[part * nnz + s];
      out[ord ? ord[s] : s] = total;
    }
  }
};

#define SPARSELAYERS_REGISTER_CONV(T)                                                                \
  REGISTER_KERNEL_BUILDER(                                                                           \
      Name("SparselayersShiftAxpy").Device(DEVICE_CPU).TypeConstraint<T>("T"), ShiftAxpyOp<T>);     \
  REGISTER_KERNEL_BUILDER(                                                                           \
      Name("SparselayersShiftDot").Device(DEVICE_CPU).TypeConstraint<T>("T"), ShiftDotOp<T>);

SPARSELAYERS_REGISTER_CONV(float)
SPARSELAYERS_REGISTER_CONV(double)

}  // namespace sparselayers
