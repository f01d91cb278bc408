// Fused tower layers for sparselayers' Towers: one block-diagonal layer of
// `towers` equal blocks, with the previous layer's bias and activation
// applied to its input on the fly, in the (batch, tower * unit) layout the
// first (dense) layer writes. No transposed copy, bias or activation pass
// over the activations is ever written.
//
// Tower t reads input columns [t * r, (t + 1) * r) and writes output columns
// [t * c, (t + 1) * c); its r x c values lie row-major from w[t * r * c].
//
// SparselayersTowerForward:  y = act(a + bias) @ W
// SparselayersTowerBackward: u = a + bias, h = act(u),
//                            da = (dy @ W.T) * act'(u), dbias = sum_b da,
//                            dW = h.T @ dy
// with act ReLU (`relu`) or the identity.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

#include "common.h"

namespace sparselayers {

REGISTER_OP("SparselayersTowerForward")
    .Input("a: T")
    .Input("bias: T")
    .Input("w: T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("towers: int >= 1")
    .Attr("units: int >= 0")
    .Attr("relu: bool")
    .SetShapeFn([](si::InferenceContext* c) {
      int64_t units;
      TF_RETURN_IF_ERROR(c->GetAttr("units", &units));
      c->set_output(0, c->Matrix(c->Dim(c->input(0), 0), units));
      return absl::OkStatus();
    });

REGISTER_OP("SparselayersTowerBackward")
    .Input("a: T")
    .Input("bias: T")
    .Input("w: T")
    .Input("dy: T")
    .Output("da: T")
    .Output("dbias: T")
    .Output("dw: T")
    .Attr("T: {float, double}")
    .Attr("towers: int >= 1")
    .Attr("relu: bool")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      return absl::OkStatus();
    });

namespace {

// Towers per work unit, at most: each batch row's slice of a unit is
// G * r contiguous values. Rows lie towers * r values apart; slices of 8
// towers (16 x 16 blocks) ran 1.5x to 3x slower than slices of 128 on the
// 2-core Intel Xeon, whose prefetchers do not follow such strides.
constexpr int64_t kMaxGroup = 128;

// Towers per work unit: kMaxGroup, fewer when that would leave a thread idle.
int64_t GroupSize(OpKernelContext* context, int64_t towers) {
  const int64_t threads = context->device()->tensorflow_cpu_worker_threads()->num_threads;
  return std::max<int64_t>(1, std::min(kMaxGroup, (towers + 4 * threads - 1) / (4 * threads)));
}

struct Shapes {
  int64_t batch, towers, r, c;
};

// Checks a (batch, towers * r), bias (towers * r), w (towers * r * c) and,
// when given, dy (batch, towers * c).
absl::Status ReadShapes(const Tensor& a, const Tensor& bias, const Tensor& w, int64_t towers, int64_t units,
                        Shapes* s) {
  if (a.dims() != 2 || bias.dims() != 1 || w.dims() != 1) {
    return absl::InvalidArgumentError("a must be a matrix, bias and w vectors");
  }
  const int64_t inputs = a.dim_size(1);
  if (inputs % towers != 0 || units % towers != 0 || bias.dim_size(0) != inputs ||
      w.dim_size(0) != (inputs / towers) * units) {
    return absl::InvalidArgumentError("a, bias and w do not hold `towers` equal blocks");
  }
  *s = {a.dim_size(0), towers, inputs / towers, units / towers};
  return absl::OkStatus();
}

template <typename T>
inline T Act(T u, bool relu) {
  return relu ? std::max(u, T(0)) : u;
}

// out[j] = sum_k v[k] * m[k * ldm + j] for j < W: W accumulators the
// compiler keeps in registers.
template <typename T, int W>
inline void VectorTimesColumns(const T* __restrict v, int64_t depth, const T* __restrict m, int64_t ldm,
                               T* __restrict out) {
  T acc[W];
#pragma omp simd
  for (int j = 0; j < W; ++j) acc[j] = 0;
  for (int64_t k = 0; k < depth; ++k) {
    const T vk = v[k];
    const T* __restrict row = m + k * ldm;
#pragma omp simd
    for (int j = 0; j < W; ++j) acc[j] += vk * row[j];
  }
#pragma omp simd
  for (int j = 0; j < W; ++j) out[j] = acc[j];
}

// out (n) = v (depth) @ m (depth x n, row stride ldm), in chunks of 16, 8,
// 4, 2 and 1 columns: any width at register speed.
template <typename T>
void VectorTimesMatrix(const T* v, int64_t depth, const T* m, int64_t ldm, T* out, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) VectorTimesColumns<T, 16>(v, depth, m + j, ldm, out + j);
  if (n - j >= 8) VectorTimesColumns<T, 8>(v, depth, m + j, ldm, out + j), j += 8;
  if (n - j >= 4) VectorTimesColumns<T, 4>(v, depth, m + j, ldm, out + j), j += 4;
  if (n - j >= 2) VectorTimesColumns<T, 2>(v, depth, m + j, ldm, out + j), j += 2;
  if (n - j >= 1) VectorTimesColumns<T, 1>(v, depth, m + j, ldm, out + j);
}

}  // namespace

template <typename T>
class TowerForwardOp : public OpKernel {
 public:
  explicit TowerForwardOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("towers", &towers_));
    OP_REQUIRES_OK(context, context->GetAttr("units", &units_));
    OP_REQUIRES_OK(context, context->GetAttr("relu", &relu_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& a = context->input(0);
    const Tensor& bias = context->input(1);
    const Tensor& w = context->input(2);
    Shapes s;
    OP_REQUIRES_OK(context, ReadShapes(a, bias, w, towers_, units_, &s));
    Tensor* y_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({s.batch, units_}), &y_tensor));
    if (y_tensor->NumElements() == 0) return;
    T* y = y_tensor->flat<T>().data();
    const T* as = a.flat<T>().data();
    const T* bs = bias.flat<T>().data();
    const T* ws = w.flat<T>().data();
    const int64_t in_row = s.towers * s.r, group = GroupSize(context, s.towers);
    const int64_t groups = (s.towers + group - 1) / group;
    const bool relu = relu_;
    ForUnits(context, groups, 2 * group * s.batch * s.r * (s.c + 1), [&](int64_t first, int64_t last) {
      std::vector<T> h(s.r);
      for (int64_t g = first; g < last; ++g) {
        const int64_t t0 = g * group, t1 = std::min(s.towers, t0 + group);
        for (int64_t b = 0; b < s.batch; ++b) {
          for (int64_t t = t0; t < t1; ++t) {
            const T* __restrict ar = as + b * in_row + t * s.r;
            const T* __restrict br = bs + t * s.r;
            T* __restrict hs = h.data();
#pragma omp simd
            for (int64_t k = 0; k < s.r; ++k) hs[k] = Act(ar[k] + br[k], relu);
            VectorTimesMatrix<T>(hs, s.r, ws + t * s.r * s.c, s.c, y + b * units_ + t * s.c, s.c);
          }
        }
      }
    });
  }

 private:
  int64_t towers_, units_;
  bool relu_;
};

template <typename T>
class TowerBackwardOp : public OpKernel {
 public:
  explicit TowerBackwardOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("towers", &towers_));
    OP_REQUIRES_OK(context, context->GetAttr("relu", &relu_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& a = context->input(0);
    const Tensor& bias = context->input(1);
    const Tensor& w = context->input(2);
    const Tensor& dy = context->input(3);
    OP_REQUIRES(context, dy.dims() == 2, absl::InvalidArgumentError("dy must be a matrix"));
    Shapes s;
    OP_REQUIRES_OK(context, ReadShapes(a, bias, w, towers_, dy.dim_size(1), &s));
    OP_REQUIRES(context, dy.dim_size(0) == s.batch, absl::InvalidArgumentError("a and dy must have one batch"));
    Tensor *da_tensor = nullptr, *db_tensor = nullptr, *dw_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, a.shape(), &da_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, bias.shape(), &db_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, w.shape(), &dw_tensor));
    T* da = da_tensor->flat<T>().data();
    T* db = db_tensor->flat<T>().data();
    T* dw = dw_tensor->flat<T>().data();
    std::fill(db, db + db_tensor->NumElements(), T(0));
    std::fill(dw, dw + dw_tensor->NumElements(), T(0));
    const T* as = a.flat<T>().data();
    const T* bs = bias.flat<T>().data();
    const T* ws = w.flat<T>().data();
    const T* g = dy.flat<T>().data();
    const int64_t in_row = s.towers * s.r, out_row = s.towers * s.c;
    const int64_t group = GroupSize(context, s.towers), groups = (s.towers + group - 1) / group;
    const bool relu = relu_;
    ForUnits(context, groups, 6 * group * s.batch * s.r * (s.c + 1), [&](int64_t first, int64_t last) {
      // W.T of the unit's towers, so that dh = dy @ W.T runs along r, as
      // the other products do.
      std::vector<T> transposed(group * s.r * s.c), u(s.r), dh(s.r);
      for (int64_t unit = first; unit < last; ++unit) {
        const int64_t t0 = unit * group, t1 = std::min(s.towers, t0 + group);
        for (int64_t t = t0; t < t1; ++t) {
          const T* wt = ws + t * s.r * s.c;
          T* tt = transposed.data() + (t - t0) * s.r * s.c;
          for (int64_t k = 0; k < s.r; ++k) {
            for (int64_t j = 0; j < s.c; ++j) tt[j * s.r + k] = wt[k * s.c + j];
          }
        }
        for (int64_t b = 0; b < s.batch; ++b) {
          for (int64_t t = t0; t < t1; ++t) {
            const T* __restrict ar = as + b * in_row + t * s.r;
            const T* __restrict br = bs + t * s.r;
            const T* __restrict gr = g + b * out_row + t * s.c;
            T* __restrict us = u.data();
            T* __restrict dhs = dh.data();
            VectorTimesMatrix<T>(gr, s.c, transposed.data() + (t - t0) * s.r * s.c, s.r, dhs, s.r);
            T* __restrict dar = da + b * in_row + t * s.r;
            T* __restrict dbr = db + t * s.r;
#pragma omp simd
            for (int64_t k = 0; k < s.r; ++k) {
              us[k] = ar[k] + br[k];
              const T d = (relu && !(us[k] > T(0))) ? T(0) : dhs[k];
              dar[k] = d;
              dbr[k] += d;
            }
            T* dwt = dw + t * s.r * s.c;
            for (int64_t k = 0; k < s.r; ++k) {
              const T hk = Act(us[k], relu);
              T* __restrict dwk = dwt + k * s.c;
#pragma omp simd
              for (int64_t j = 0; j < s.c; ++j) dwk[j] += hk * gr[j];
            }
          }
        }
      }
    });
  }

 private:
  int64_t towers_;
  bool relu_;
};

#define SPARSELAYERS_REGISTER_TOWER(T)                                                                 \
  REGISTER_KERNEL_BUILDER(                                                                             \
      Name("SparselayersTowerForward").Device(DEVICE_CPU).TypeConstraint<T>("T"), TowerForwardOp<T>);  \
  REGISTER_KERNEL_BUILDER(                                                                             \
      Name("SparselayersTowerBackward").Device(DEVICE_CPU).TypeConstraint<T>("T"), TowerBackwardOp<T>);

SPARSELAYERS_REGISTER_TOWER(float)
SPARSELAYERS_REGISTER_TOWER(double)

}  // namespace sparselayers
