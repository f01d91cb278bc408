// Fused block products for sparselayers: each dense block of the pattern is
// multiplied in place, with no transposed copy of x, y or dy.
//
// A block j covers input rows [r0, r0 + nr) and output columns [c0, c0 + nc)
// and holds its nr x nc values row-major from values[vo]. Blocks share no
// row, column or value (checked).
//
// SparselayersBlockMatmul: y[:, c0:c0+nc] = x[:, r0:r0+nr] @ W_j
// SparselayersBlockGrad:   dx[:, r0:r0+nr] = dy[:, c0:c0+nc] @ W_j.T and
//                          dW_j = x[:, r0:r0+nr].T @ dy[:, c0:c0+nc]
//
// Every product runs through one register-tiled micro kernel, written as
// plain loops of fixed length that the compiler keeps in vector registers
// (kRows x kColumnBytes of accumulators), on operands read in place through
// their strides.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

#include "common.h"

namespace sparselayers {

REGISTER_OP("SparselayersBlockMatmul")
    .Input("x: T")
    .Input("values: T")
    .Input("blocks: int64")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("units: int >= 0")
    .SetShapeFn([](si::InferenceContext* c) {
      int64_t units;
      TF_RETURN_IF_ERROR(c->GetAttr("units", &units));
      c->set_output(0, c->Matrix(c->Dim(c->input(0), 0), units));
      return absl::OkStatus();
    });

REGISTER_OP("SparselayersBlockGrad")
    .Input("x: T")
    .Input("dy: T")
    .Input("values: T")
    .Input("blocks: int64")
    .Output("dx: T")
    .Output("dvalues: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(2));
      return absl::OkStatus();
    });

namespace {

// Rows of the register tile, and bytes of its columns (two AVX-512 or four
// AVX2 registers): the shape measured fastest for 64 x 64 blocks at batch
// 256 among 4 to 16 rows and 64 to 256 bytes (AMD EPYC, Zen 4).
constexpr int kRows = 8;
constexpr int kColumnBytes = 128;

// C[i, j] = sum_k A[i * sai + k * sak] * B[k * ldb + j], i < R, j < N.
template <typename T, int R, int N>
void Tile(const T* __restrict a, int64_t sai, int64_t sak, const T* __restrict b, int64_t ldb, T* __restrict c,
          int64_t ldc, int64_t depth) {
  T acc[R][N];
  for (int i = 0; i < R; ++i) {
#pragma omp simd
    for (int j = 0; j < N; ++j) acc[i][j] = 0;
  }
  for (int64_t k = 0; k < depth; ++k) {
    const T* row = b + k * ldb;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const T scale = a[i * sai + k * sak];
#pragma omp simd
      for (int j = 0; j < N; ++j) acc[i][j] += scale * row[j];
    }
  }
  for (int i = 0; i < R; ++i) {
#pragma omp simd
    for (int j = 0; j < N; ++j) c[i * ldc + j] = acc[i][j];
  }
}

// The same for an m x n edge tile of any size.
template <typename T>
void EdgeTile(const T* a, int64_t sai, int64_t sak, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t depth,
              int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    T* out = c + i * ldc;
    std::fill(out, out + n, T(0));
    for (int64_t k = 0; k < depth; ++k) {
      const T scale = a[i * sai + k * sak];
      const T* row = b + k * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] += scale * row[j];
    }
  }
}

// C (m x n, row stride ldc) = A (m x depth, strides sai, sak) @ B (depth x n, row stride ldb).
template <typename T>
void Gemm(const T* a, int64_t sai, int64_t sak, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t m, int64_t n,
          int64_t depth) {
  constexpr int kColumns = kColumnBytes / sizeof(T);
  int64_t j = 0;
  for (; j + kColumns <= n; j += kColumns) {
    int64_t i = 0;
    for (; i + kRows <= m; i += kRows) {
      Tile<T, kRows, kColumns>(a + i * sai, sai, sak, b + j, ldb, c + i * ldc + j, ldc, depth);
    }
    if (i < m) EdgeTile(a + i * sai, sai, sak, b + j, ldb, c + i * ldc + j, ldc, depth, m - i, kColumns);
  }
  if (j < n) EdgeTile(a, sai, sak, b + j, ldb, c + j, ldc, depth, m, n - j);
}

struct Block {
  int64_t row, col, rows, cols, value;
};

// True when no two of the non-empty ranges [start, start + size) overlap.
bool Disjoint(std::vector<std::pair<int64_t, int64_t>> ranges) {
  ranges.erase(std::remove_if(ranges.begin(), ranges.end(), [](const auto& r) { return r.second == 0; }), ranges.end());
  std::sort(ranges.begin(), ranges.end());
  for (size_t j = 1; j < ranges.size(); ++j) {
    if (ranges[j - 1].first + ranges[j - 1].second > ranges[j].first) return false;
  }
  return true;
}

// Reads and checks the (k, 5) block table against the operands' sizes:
// every block inside them, no two sharing a row or a column (threads
// write each block's rows and columns without locks), no two sharing a
// value. `covers` says whether the blocks fill every row and column, and
// `fills` whether they use every value; otherwise outputs start from zeros.
absl::Status ReadBlocks(const Tensor& table, int64_t input_dim, int64_t units, int64_t nnz,
                        std::vector<Block>* blocks, bool* covers, bool* fills) {
  if (table.dims() != 2 || table.dim_size(1) != 5) return absl::InvalidArgumentError("blocks must be a (k, 5) matrix");
  const auto t = table.matrix<int64_t>();
  int64_t rows = 0, cols = 0, area = 0;
  std::vector<std::pair<int64_t, int64_t>> row_ranges, col_ranges, value_ranges;
  for (int64_t j = 0; j < table.dim_size(0); ++j) {
    const Block b{t(j, 0), t(j, 1), t(j, 2), t(j, 3), t(j, 4)};
    if (b.row < 0 || b.col < 0 || b.rows < 0 || b.cols < 0 || b.value < 0 || b.row > input_dim - b.rows ||
        b.col > units - b.cols || (b.rows && b.cols > (nnz - b.value) / b.rows)) {
      return absl::InvalidArgumentError(absl::StrCat("block ", j, " lies outside the operands"));
    }
    rows += b.rows;
    cols += b.cols;
    area += b.rows * b.cols;
    row_ranges.emplace_back(b.row, b.rows);
    col_ranges.emplace_back(b.col, b.cols);
    value_ranges.emplace_back(b.value, b.rows * b.cols);
    blocks->push_back(b);
  }
  if (!Disjoint(row_ranges) || !Disjoint(col_ranges) || !Disjoint(value_ranges)) {
    return absl::InvalidArgumentError("blocks must not share a row, a column or a value");
  }
  *covers = rows == input_dim && cols == units;
  *fills = area == nnz;
  return absl::OkStatus();
}

// Part `part` of `parts` of [0, total), its bounds multiples of kRows.
std::pair<int64_t, int64_t> Span(int64_t total, int64_t parts, int64_t part) {
  auto bound = [&](int64_t p) { return p == parts ? total : std::min(total, (total * p / parts) / kRows * kRows); };
  return {bound(part), bound(part + 1)};
}

// Parts per block so that the blocks, split, keep every thread busy.
int64_t PartsPerBlock(OpKernelContext* context, int64_t blocks, int64_t rows) {
  const int64_t threads = context->device()->tensorflow_cpu_worker_threads()->num_threads;
  const int64_t wanted = blocks ? (4 * threads + blocks - 1) / blocks : 1;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, rows / (4 * kRows)));
}

}  // namespace

template <typename T>
class BlockMatmulOp : public OpKernel {
 public:
  explicit BlockMatmulOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("units", &units_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& values = context->input(1);
    OP_REQUIRES(context, x.dims() == 2 && values.dims() == 1,
                absl::InvalidArgumentError("x must be a matrix and values a vector"));
    std::vector<Block> blocks;
    bool covers = false, fills = false;
    OP_REQUIRES_OK(context, ReadBlocks(context->input(2), x.dim_size(1), units_, values.NumElements(), &blocks, &covers,
                                       &fills));
    const int64_t batch = x.dim_size(0);
    const int64_t input_dim = x.dim_size(1);
    Tensor* y_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, units_}), &y_tensor));
    T* y = y_tensor->flat<T>().data();
    if (!covers && y_tensor->NumElements()) std::memset(y, 0, sizeof(T) * y_tensor->NumElements());
    if (batch == 0 || blocks.empty()) return;
    const T* xs = x.flat<T>().data();
    const T* v = values.flat<T>().data();
    const int64_t parts = PartsPerBlock(context, blocks.size(), batch);
    const int64_t cost = 2 * blocks[0].rows * blocks[0].cols * (batch / parts + 1);
    ForUnits(context, blocks.size() * parts, cost, [&](int64_t first, int64_t last) {
      for (int64_t unit = first; unit < last; ++unit) {
        const Block& b = blocks[unit / parts];
        const auto [lo, hi] = Span(batch, parts, unit % parts);
        Gemm<T>(xs + lo * input_dim + b.row, input_dim, 1, v + b.value, b.cols, y + lo * units_ + b.col, units_,
                hi - lo, b.cols, b.rows);
      }
    });
  }

 private:
  int64_t units_;
};

template <typename T>
class BlockGradOp : public OpKernel {
 public:
  explicit BlockGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& dy = context->input(1);
    const Tensor& values = context->input(2);
    OP_REQUIRES(context, x.dims() == 2 && dy.dims() == 2 && values.dims() == 1 && x.dim_size(0) == dy.dim_size(0),
                absl::InvalidArgumentError("x and dy must be matrices of one batch, values a vector"));
    std::vector<Block> blocks;
    bool covers = false, fills = false;
    OP_REQUIRES_OK(context, ReadBlocks(context->input(3), x.dim_size(1), dy.dim_size(1), values.NumElements(),
                                       &blocks, &covers, &fills));
    const int64_t batch = x.dim_size(0);
    const int64_t input_dim = x.dim_size(1);
    const int64_t units = dy.dim_size(1);
    Tensor* dx_tensor = nullptr;
    Tensor* dv_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, values.shape(), &dv_tensor));
    T* dx = dx_tensor->flat<T>().data();
    T* dv = dv_tensor->flat<T>().data();
    if (!covers && dx_tensor->NumElements()) std::memset(dx, 0, sizeof(T) * dx_tensor->NumElements());
    if (!fills && dv_tensor->NumElements()) std::memset(dv, 0, sizeof(T) * dv_tensor->NumElements());
    if (blocks.empty()) return;
    const T* xs = x.flat<T>().data();
    const T* g = dy.flat<T>().data();
    const T* v = values.flat<T>().data();
    // Each unit computes one part of a block's dx rows (batch) and of its
    // dW rows (input rows), reading the block's dy while it is in cache.
    const int64_t parts = PartsPerBlock(context, blocks.size(), std::max(batch, blocks[0].rows));
    const int64_t cost = 4 * blocks[0].rows * blocks[0].cols * (batch / parts + 1);
    ForUnits(context, blocks.size() * parts, cost, [&](int64_t first, int64_t last) {
      std::vector<T> transposed;
      for (int64_t unit = first; unit < last; ++unit) {
        const Block& b = blocks[unit / parts];
        const int64_t part = unit % parts;
        const auto [lo, hi] = Span(batch, parts, part);
        if (hi > lo) {
          transposed.resize(b.rows * b.cols);
          const T* w = v + b.value;
          for (int64_t r = 0; r < b.rows; ++r) {
            for (int64_t c = 0; c < b.cols; ++c) transposed[c * b.rows + r] = w[r * b.cols + c];
          }
          Gemm<T>(g + lo * units + b.col, units, 1, transposed.data(), b.rows, dx + lo * input_dim + b.row,
                  input_dim, hi - lo, b.rows, b.cols);
        }
        const auto [first_row, last_row] = Span(b.rows, parts, part);
        Gemm<T>(xs + b.row + first_row, 1, input_dim, g + b.col, units, dv + b.value + first_row * b.cols, b.cols,
                last_row - first_row, b.cols, batch);
      }
    });
  }
};

#define SPARSELAYERS_REGISTER_BLOCK(T)                                                                \
  REGISTER_KERNEL_BUILDER(                                                                            \
      Name("SparselayersBlockMatmul").Device(DEVICE_CPU).TypeConstraint<T>("T"), BlockMatmulOp<T>);   \
  REGISTER_KERNEL_BUILDER(                                                                            \
      Name("SparselayersBlockGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), BlockGradOp<T>);

SPARSELAYERS_REGISTER_BLOCK(float)
SPARSELAYERS_REGISTER_BLOCK(double)

}  // namespace sparselayers
