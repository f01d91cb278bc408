// The block layers of `Towers`, fused: every tower's small MLP after the
// shared first layer, read and written in the first layer's own
// (batch, tower * unit) layout.
//
// widths = [w0, w1, ..., wk]: w0 the first layer's units per tower, then
// one block layer l = 1..k of w_{l-1} x w_l weights per tower
// (weights[l - 1][t * w_{l-1} * w_l + i * w_l + j], the block-diagonal
// pattern's canonical order) and w_l biases per tower (empty: none).
//
// SparselayersTowerForward:  a_0 = act(h + first_bias), z_l = a_{l-1} @ W_l[t] + b_l[t],
//                            a_l = act(z_l) for l < k, y = z_k (the output
//                            activation is the caller's).
// SparselayersTowerBackward: from dy = dL/dz_k, the gradients w.r.t. h,
//                            first_bias, every W_l and b_l; the activations
//                            are recomputed from h, never stored.
// act is ReLU (`relu`) or the identity. The 16 MiB of a Towers(1024, [16,
// 16]) step's first-layer output are read once per op and dh written once:
// no transposes, no separate bias, ReLU or bias-gradient passes.
// A tower's rows go a block of kRows at a time; towers are split over
// TensorFlow's intra-op threads, so every tower's gradients have one owner.

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

using ::tensorflow::OpInputList;
using ::tensorflow::OpOutputList;

namespace {

absl::Status CheckWidths(const std::vector<int64_t>& widths, int64_t layers) {
  if (static_cast<int64_t>(widths.size()) != layers + 1) {
    return absl::InvalidArgumentError("widths must have one entry more than there are block layers");
  }
  for (int64_t w : widths) {
    if (w < 1) return absl::InvalidArgumentError("widths must be positive");
  }
  return absl::OkStatus();
}

absl::Status TowerShapes(si::InferenceContext* c, std::vector<int64_t>* widths, int64_t* towers) {
  TF_RETURN_IF_ERROR(c->GetAttr("widths", widths));
  TF_RETURN_IF_ERROR(c->GetAttr("towers", towers));
  int64_t layers;
  TF_RETURN_IF_ERROR(c->GetAttr("N", &layers));
  return CheckWidths(*widths, layers);
}

}  // namespace

// The attributes both tower ops take.
#define SPARSELAYERS_TOWER_ATTRS \
  .Attr("T: {float, double}")    \
  .Attr("N: int >= 1")           \
  .Attr("towers: int >= 1")      \
  .Attr("widths: list(int)")     \
  .Attr("relu: bool")

REGISTER_OP("SparselayersTowerForward")
    .Input("h: T")
    .Input("first_bias: T")
    .Input("weights: N * T")
    .Input("biases: N * T")
    .Output("y: T")
    SPARSELAYERS_TOWER_ATTRS
    .SetShapeFn([](si::InferenceContext* c) {
      std::vector<int64_t> widths;
      int64_t towers;
      TF_RETURN_IF_ERROR(TowerShapes(c, &widths, &towers));
      c->set_output(0, c->Matrix(c->Dim(c->input(0), 0), towers * widths.back()));
      return absl::OkStatus();
    });

REGISTER_OP("SparselayersTowerBackward")
    .Input("dy: T")
    .Input("h: T")
    .Input("first_bias: T")
    .Input("weights: N * T")
    .Input("biases: N * T")
    .Output("dh: T")
    .Output("dfirst_bias: T")
    .Output("dweights: N * T")
    .Output("dbiases: N * T")
    SPARSELAYERS_TOWER_ATTRS
    .SetShapeFn([](si::InferenceContext* c) {
      std::vector<int64_t> widths;
      int64_t towers;
      TF_RETURN_IF_ERROR(TowerShapes(c, &widths, &towers));
      const int64_t layers = static_cast<int64_t>(widths.size()) - 1;
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(2));
      for (int64_t l = 0; l < 2 * layers; ++l) c->set_output(2 + l, c->input(3 + l));
      return absl::OkStatus();
    });

namespace {

constexpr int64_t kRows = 8;
// Towers ahead whose rows of h are prefetched.
constexpr int64_t kAhead = 4;

// The op's inputs, checked: pointers to every layer's weights and biases
// (nullptr: no bias).
template <typename T>
struct Tower {
  int64_t towers = 0, batch = 0, layers = 0;
  std::vector<int64_t> widths;
  bool relu = false;
  const T* h = nullptr;
  const T* first_bias = nullptr;
  std::vector<const T*> weights, biases;

  int64_t in_width() const { return towers * widths[0]; }
  int64_t out_width() const { return towers * widths.back(); }
  int64_t widest() const { return *std::max_element(widths.begin(), widths.end()); }
};

template <typename T>
absl::Status ReadTower(OpKernelContext* context, const std::vector<int64_t>& widths, int64_t towers, bool relu,
                       int first, Tower<T>* out) {
  out->widths = widths;
  out->towers = towers;
  out->relu = relu;
  out->layers = static_cast<int64_t>(widths.size()) - 1;
  const Tensor& h = context->input(first);
  if (h.dims() != 2 || h.dim_size(1) != towers * widths[0]) {
    return absl::InvalidArgumentError(absl::StrCat("h must be a matrix of ", towers * widths[0], " columns"));
  }
  out->batch = h.dim_size(0);
  out->h = h.flat<T>().data();
  const Tensor& fb = context->input(first + 1);
  if (fb.dims() != 1 || (fb.NumElements() != 0 && fb.NumElements() != towers * widths[0])) {
    return absl::InvalidArgumentError("first_bias must be empty or have one entry per column of h");
  }
  out->first_bias = fb.NumElements() ? fb.flat<T>().data() : nullptr;
  OpInputList weights, biases;
  TF_RETURN_IF_ERROR(context->input_list("weights", &weights));
  TF_RETURN_IF_ERROR(context->input_list("biases", &biases));
  for (int64_t l = 0; l < out->layers; ++l) {
    const Tensor& w = weights[l];
    const Tensor& b = biases[l];
    if (w.dims() != 1 || w.NumElements() != towers * widths[l] * widths[l + 1]) {
      return absl::InvalidArgumentError(absl::StrCat("weights[", l, "] must have ", towers * widths[l] * widths[l + 1],
                                                     " entries"));
    }
    if (b.dims() != 1 || (b.NumElements() != 0 && b.NumElements() != towers * widths[l + 1])) {
      return absl::InvalidArgumentError(absl::StrCat("biases[", l, "] must be empty or have ", towers * widths[l + 1],
                                                     " entries"));
    }
    out->weights.push_back(w.flat<T>().data());
    out->biases.push_back(b.NumElements() ? b.flat<T>().data() : nullptr);
  }
  return absl::OkStatus();
}

// Per thread: the activations of one block of rows of one tower, every layer.
template <typename T>
struct Scratch {
  // z[l]: layer l's pre-activations (rows x w_l), l = 0 the first layer's
  // h + bias; a[l] = act(z[l]) for l < k.
  std::vector<std::vector<T>> z, a;
  std::vector<T> grad, next;
  explicit Scratch(const Tower<T>& s) : z(s.layers + 1), a(s.layers + 1) {
    for (int64_t l = 0; l <= s.layers; ++l) {
      z[l].resize(kRows * s.widths[l]);
      a[l].resize(kRows * s.widths[l]);
    }
    grad.resize(kRows * s.widest());
    next.resize(kRows * s.widest());
  }
};

// A full block of kRows rows, b == kLanes<T> (16 floats): out[r] = bias +
// sum_i in[r][i] * w[i], the kRows sums in registers, each row of w loaded
// once for all of them.
template <typename T>
void ProductVector(const T* __restrict in, int64_t a, const T* __restrict w, const T* __restrict bias,
                   T* __restrict out) {
  Vector<T> acc[kRows];
  const Vector<T> start = bias ? Load(bias) : Vector<T>{};
  for (int64_t r = 0; r < kRows; ++r) acc[r] = start;
  for (int64_t i = 0; i < a; ++i) {
    const Vector<T> row = Load(w + i * kLanes<T>);
    for (int64_t r = 0; r < kRows; ++r) acc[r] += in[r * a + i] * row;
  }
  for (int64_t r = 0; r < kRows; ++r) Store(out + r * kLanes<T>, acc[r]);
}

// out[r * b + j] = bias[j] + sum_i in[r * a + i] * w[i * b + j], r < rows.
template <typename T>
void Product(const T* __restrict in, int64_t a, const T* __restrict w, const T* __restrict bias, int64_t b,
             int64_t rows, T* __restrict out) {
  if (b == kLanes<T> && rows == kRows) return ProductVector(in, a, w, bias, out);
  if (b == 1 && a == kLanes<T>) {
    const Vector<T> wv = Load(w);
    for (int64_t r = 0; r < rows; ++r) {
      out[r] = (bias ? bias[0] : T(0)) + LaneSum<T>(Load(in + r * a) * wv);
    }
    return;
  }
  if (b == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict x = in + r * a;
      T total = bias ? bias[0] : T(0);
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < a; ++i) total += x[i] * w[i];
      out[r] = total;
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * b;
    if (bias) {
      std::copy(bias, bias + b, o);
    } else {
      std::fill(o, o + b, T(0));
    }
    for (int64_t i = 0; i < a; ++i) {
      const T x = in[r * a + i];
      const T* __restrict row = w + i * b;
#pragma omp simd
      for (int64_t j = 0; j < b; ++j) o[j] += x * row[j];
    }
  }
}

// dw[i * b + j] += sum_r a[r * n + i] * g[r * b + j], r < rows (n inputs, b outputs).
template <typename T>
void AddOuter(const T* __restrict a, int64_t n, const T* __restrict g, int64_t b, int64_t rows, T* __restrict dw) {
  if (b == kLanes<T> && rows == kRows) {
    Vector<T> gr[kRows];
    for (int64_t r = 0; r < kRows; ++r) gr[r] = Load(g + r * kLanes<T>);
    for (int64_t i = 0; i < n; ++i) {
      Vector<T> acc = Load(dw + i * kLanes<T>);
      for (int64_t r = 0; r < kRows; ++r) acc += a[r * n + i] * gr[r];
      Store(dw + i * kLanes<T>, acc);
    }
    return;
  }
  if (b == 1 && n == kLanes<T>) {
    Vector<T> acc = Load(dw);
    for (int64_t r = 0; r < rows; ++r) acc += g[r] * Load(a + r * n);
    Store(dw, acc);
    return;
  }
  if (b == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const T gr = g[r];
      const T* __restrict x = a + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dw[i] += x[i] * gr;
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const T x = a[r * n + i];
      T* __restrict row = dw + i * b;
      const T* __restrict gr = g + r * b;
#pragma omp simd
      for (int64_t j = 0; j < b; ++j) row[j] += x * gr[j];
    }
  }
}

// sum[j] += rows[r * n + j], r < count: in whole vectors where n is one
// (the loops on 16 floats must match the 64-byte stores they read, or
// every load waits for store forwarding to fail).
template <typename T>
void AddRows(const T* __restrict rows, int64_t n, int64_t count, T* __restrict sum) {
  if (n == kLanes<T>) {
    Vector<T> total = Load(sum);
    for (int64_t r = 0; r < count; ++r) total += Load(rows + r * n);
    Store(sum, total);
    return;
  }
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t j = 0; j < n; ++j) sum[j] += rows[r * n + j];
  }
}

// out[k] = z[k] > 0 ? next[k] : 0 (ReLU's gradient), k < count.
template <typename T>
void ReluGrad(const T* __restrict z, const T* __restrict next, int64_t count, T* __restrict out) {
  int64_t k = 0;
  const Vector<T> zero = {};
  for (; k + kLanes<T> <= count; k += kLanes<T>) {
    const Vector<T> v = Load(z + k);
    Store(out + k, v > zero ? Load(next + k) : zero);
  }
  for (; k < count; ++k) out[k] = z[k] > T(0) ? next[k] : T(0);
}

// Writes v to `to`, 64-byte aligned when `stream`: a non-temporal store (the
// line is not read first, nor kept in cache).
template <typename T>
inline void StoreRow(T* __restrict to, const Vector<T>& v, bool stream) {
#ifdef __AVX512F__
  if (stream) {
    __m512i bits;
    std::memcpy(&bits, &v, sizeof(bits));
    _mm512_stream_si512(reinterpret_cast<__m512i*>(to), bits);
    return;
  }
#endif
  Store(to, v);
}

// to[r * stride + j] = from[r * n + j], r < count, j < n; with `stream`,
// whole aligned 64-byte lines go straight to memory (non-temporal stores:
// the written lines are not read first, nor kept in cache).
template <typename T>
void CopyRows(const T* __restrict from, int64_t n, int64_t count, T* __restrict to, int64_t stride,
              bool stream = false) {
#ifdef __AVX512F__
  if (stream && n == kLanes<T> && reinterpret_cast<uintptr_t>(to) % 64 == 0 && (stride * sizeof(T)) % 64 == 0) {
    for (int64_t r = 0; r < count; ++r) StoreRow(to + r * stride, Load(from + r * n), /*stream=*/true);
    return;
  }
#endif
  if (n == kLanes<T>) {
    for (int64_t r = 0; r < count; ++r) Store(to + r * stride, Load(from + r * n));
    return;
  }
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t j = 0; j < n; ++j) to[r * stride + j] = from[r * n + j];
  }
}

// Tower t's rows [r0, r0 + rows): every layer's pre-activations and
// activations into `s`.
template <typename T>
void Forward(const Tower<T>& tw, int64_t t, int64_t r0, int64_t rows, Scratch<T>& s, bool last = true) {
  const int64_t w0 = tw.widths[0];
  const T* fb = tw.first_bias ? tw.first_bias + t * w0 : nullptr;
  if (w0 == kLanes<T>) {
    const Vector<T> bias = fb ? Load(fb) : Vector<T>{}, zero = {};
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = tw.h + (r0 + r) * tw.in_width() + t * w0;
      // The towers after the next, in the same rows: a page of a row holds
      // only 64 towers, too few for the hardware prefetcher to run ahead.
      if (t + kAhead < tw.towers) __builtin_prefetch(row + kAhead * w0);
      const Vector<T> z = Load(row) + bias;
      Store(s.z[0].data() + r * w0, z);
      Store(s.a[0].data() + r * w0, tw.relu ? (z > zero ? z : zero) : z);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = tw.h + (r0 + r) * tw.in_width() + t * w0;
      T* z = s.z[0].data() + r * w0;
      T* a = s.a[0].data() + r * w0;
      for (int64_t i = 0; i < w0; ++i) z[i] = fb ? src[i] + fb[i] : src[i];
      for (int64_t i = 0; i < w0; ++i) a[i] = tw.relu ? std::max(z[i], T(0)) : z[i];
    }
  }
  for (int64_t l = 1; l <= tw.layers - (last ? 0 : 1); ++l) {
    const int64_t in = tw.widths[l - 1], out = tw.widths[l];
    const T* bias = tw.biases[l - 1] ? tw.biases[l - 1] + t * out : nullptr;
    Product(s.a[l - 1].data(), in, tw.weights[l - 1] + t * in * out, bias, out, rows, s.z[l].data());
    if (l < tw.layers && tw.relu) {
      ReluGrad(s.z[l].data(), s.z[l].data(), rows * out, s.a[l].data());  // z > 0 ? z : 0
    } else if (l < tw.layers) {
      std::copy_n(s.z[l].data(), rows * out, s.a[l].data());
    }
  }
}

// The first block layer of widths {L, L, ...} for kRows rows of tower t:
// a0 = act(h + first_bias) into the scratch rows `a0` (the products
// broadcast from them), acc = a0 @ W1 + b1 in registers.
template <typename T>
inline __attribute__((always_inline)) void HiddenSquare(const Tower<T>& tw, int64_t t, int64_t r0, T* __restrict a0,
                                                       Vector<T> (&acc)[kRows]) {
  constexpr int64_t L = kLanes<T>;
  const Vector<T> zero = {};
  const Vector<T> fb = tw.first_bias ? Load(tw.first_bias + t * L) : zero;
  for (int64_t r = 0; r < kRows; ++r) {
    const T* row = tw.h + (r0 + r) * tw.in_width() + t * L;
    if (t + kAhead < tw.towers) __builtin_prefetch(row + kAhead * L);
    const Vector<T> z = Load(row) + fb;
    Store(a0 + r * L, tw.relu ? (z > zero ? z : zero) : z);
  }
  const T* __restrict w1 = tw.weights[0] + t * L * L;
  const Vector<T> b1 = tw.biases[0] ? Load(tw.biases[0] + t * L) : zero;
  for (int64_t r = 0; r < kRows; ++r) acc[r] = b1;
  for (int64_t i = 0; i < L; ++i) {
    const Vector<T> w = Load(w1 + i * L);
    for (int64_t r = 0; r < kRows; ++r) acc[r] += a0[r * L + i] * w;
  }
}

// Forward, for the common widths {L, L, 1} (L = kLanes<T>: 16 floats) and a
// full block of kRows rows: only the first layer's activations go through
// `a0` (the products broadcast from it); the hidden layer stays in registers
// and the output is written to y[r * y_stride]. The general Forward stores
// and reloads every layer, and that round trip through the scratch rows was
// where its time went (perf: store-to-load stalls on the reloaded rows).
template <typename T>
void ForwardSquareToOne(const Tower<T>& tw, int64_t t, int64_t r0, T* __restrict a0, T* __restrict y,
                        int64_t y_stride) {
  constexpr int64_t L = kLanes<T>;
  const Vector<T> zero = {};
  Vector<T> acc[kRows];
  HiddenSquare(tw, t, r0, a0, acc);
  const Vector<T> w2 = Load(tw.weights[1] + t * L);
  const T b2 = tw.biases[1] ? tw.biases[1][t] : T(0);
  for (int64_t r = 0; r < kRows; ++r) {
    const Vector<T> a1 = tw.relu ? (acc[r] > zero ? acc[r] : zero) : acc[r];
    y[r * y_stride] = b2 + LaneSum<T>(a1 * w2);
  }
}

// The backward op's block for widths {L, L, 1} and kRows rows, as
// ForwardSquareToOne: the hidden layer, its gradient and the gradient of h
// stay in registers; `a0` and `g1` hold the rows the products broadcast
// from. dw1t is W1's transpose (row j: the weights out of unit j).
template <typename T>
void BackwardSquareToOne(const Tower<T>& tw, int64_t t, int64_t r0, const T* __restrict dy, const T* __restrict w1t,
                         T* __restrict a0, T* __restrict g1, T* __restrict dh, bool stream, T* __restrict dfb,
                         T* __restrict dw1, T* __restrict db1, T* __restrict dw2, T* __restrict db2) {
  constexpr int64_t L = kLanes<T>;
  const Vector<T> zero = {};
  Vector<T> acc[kRows];
  HiddenSquare(tw, t, r0, a0, acc);
  // Output layer: y = b2 + a1 . w2, its gradient g2 = dy.
  const Vector<T> w2 = Load(tw.weights[1] + t * L);
  Vector<T> dw2_sum = Load(dw2 + t * L), db1_sum = db1 ? Load(db1 + t * L) : zero;
  T db2_sum = T(0);
  for (int64_t r = 0; r < kRows; ++r) {
    const T g2 = dy[(r0 + r) * tw.out_width() + t];
    const Vector<T> a1 = tw.relu ? (acc[r] > zero ? acc[r] : zero) : acc[r];
    dw2_sum += g2 * a1;
    db2_sum += g2;
    const Vector<T> g = g2 * w2;
    acc[r] = tw.relu ? (acc[r] > zero ? g : zero) : g;  // now dL/dz1
    db1_sum += acc[r];
    Store(g1 + r * L, acc[r]);
  }
  Store(dw2 + t * L, dw2_sum);
  if (db2) db2[t] += db2_sum;
  if (db1) Store(db1 + t * L, db1_sum);
  // dW1[i] += sum_r a0[r][i] * g1[r]; 8 rows of dW1 at a time, each its own sum.
  T* __restrict dw = dw1 + t * L * L;
  for (int64_t i0 = 0; i0 < L; i0 += 8) {
    Vector<T> rows[8];
    for (int64_t k = 0; k < 8; ++k) rows[k] = Load(dw + (i0 + k) * L);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t k = 0; k < 8; ++k) rows[k] += a0[r * L + i0 + k] * acc[r];
    }
    for (int64_t k = 0; k < 8; ++k) Store(dw + (i0 + k) * L, rows[k]);
  }
  // dh[r] = g1[r] @ W1.T, masked by ReLU's gradient at z0 (a0 > 0).
  Vector<T> out[kRows];
  for (int64_t r = 0; r < kRows; ++r) out[r] = zero;
  const T* __restrict wt = w1t + t * L * L;
  for (int64_t j = 0; j < L; ++j) {
    const Vector<T> w = Load(wt + j * L);
    for (int64_t r = 0; r < kRows; ++r) out[r] += g1[r * L + j] * w;
  }
  Vector<T> dfb_sum = dfb ? Load(dfb + t * L) : zero;
  for (int64_t r = 0; r < kRows; ++r) {
    if (tw.relu) {
      const Vector<T> a = Load(a0 + r * L);
      out[r] = a > zero ? out[r] : zero;
    }
    dfb_sum += out[r];
    StoreRow(dh + (r0 + r) * tw.in_width() + t * L, out[r], stream);
  }
  if (dfb) Store(dfb + t * L, dfb_sum);
}

// The attributes both tower ops share.
class TowerOpBase : public OpKernel {
 public:
  explicit TowerOpBase(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("widths", &widths_));
    OP_REQUIRES_OK(context, context->GetAttr("towers", &towers_));
    OP_REQUIRES_OK(context, context->GetAttr("relu", &relu_));
    int64_t layers;
    OP_REQUIRES_OK(context, context->GetAttr("N", &layers));
    OP_REQUIRES_OK(context, CheckWidths(widths_, layers));
  }

 protected:
  std::vector<int64_t> widths_;
  int64_t towers_;
  bool relu_;
};

template <typename T>
class TowerForwardOp : public TowerOpBase {
 public:
  explicit TowerForwardOp(OpKernelConstruction* context) : TowerOpBase(context) {}

  void Compute(OpKernelContext* context) override {
    Tower<T> tw;
    OP_REQUIRES_OK(context, ReadTower<T>(context, widths_, towers_, relu_, 0, &tw));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({tw.batch, tw.out_width()}), &y));
    if (y->NumElements() == 0) return;
    T* out = y->flat<T>().data();
    const int64_t wk = widths_.back();
    const bool square_to_one = widths_ == std::vector<int64_t>{kLanes<T>, kLanes<T>, 1};
    int64_t flops = 0;
    for (int64_t l = 1; l < static_cast<int64_t>(widths_.size()); ++l) flops += widths_[l - 1] * widths_[l];
    ForUnits(context, towers_, 2 * tw.batch * (flops + widths_[0]), [&](int64_t first, int64_t last) {
      Scratch<T> s(tw);
      // Rows outer, towers inner: each row of h is read along its length.
      for (int64_t r0 = 0; r0 < tw.batch; r0 += kRows) {
        for (int64_t t = first; t < last; ++t) {
          const int64_t rows = std::min(kRows, tw.batch - r0);
          if (square_to_one && rows == kRows) {
            ForwardSquareToOne(tw, t, r0, s.a[0].data(), out + r0 * tw.out_width() + t, tw.out_width());
            continue;
          }
          Forward(tw, t, r0, rows, s);
          CopyRows(s.z[tw.layers].data(), wk, rows, out + r0 * tw.out_width() + t * wk, tw.out_width());
        }
      }
    });
  }

};

template <typename T>
class TowerBackwardOp : public TowerOpBase {
 public:
  explicit TowerBackwardOp(OpKernelConstruction* context) : TowerOpBase(context) {}

  void Compute(OpKernelContext* context) override {
    Tower<T> tw;
    OP_REQUIRES_OK(context, ReadTower<T>(context, widths_, towers_, relu_, 1, &tw));
    const Tensor& dy_tensor = context->input(0);
    OP_REQUIRES(context, dy_tensor.dims() == 2 && dy_tensor.dim_size(0) == tw.batch &&
                             dy_tensor.dim_size(1) == tw.out_width(),
                absl::InvalidArgumentError("dy must have h's rows and one column per tower output"));
    const T* dy = dy_tensor.flat<T>().data();
    const int64_t layers = tw.layers;
    Tensor* dh_tensor = nullptr;
    Tensor* dfb_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(1).shape(), &dh_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(2).shape(), &dfb_tensor));
    OpOutputList dweights, dbiases;
    OP_REQUIRES_OK(context, context->output_list("dweights", &dweights));
    OP_REQUIRES_OK(context, context->output_list("dbiases", &dbiases));
    std::vector<T*> dw(layers), db(layers);
    for (int64_t l = 0; l < layers; ++l) {
      Tensor* w = nullptr;
      Tensor* b = nullptr;
      OP_REQUIRES_OK(context, dweights.allocate(l, context->input(3 + l).shape(), &w));
      OP_REQUIRES_OK(context, dbiases.allocate(l, context->input(3 + layers + l).shape(), &b));
      dw[l] = w->flat<T>().data();
      db[l] = b->NumElements() ? b->flat<T>().data() : nullptr;
      std::fill_n(dw[l], w->NumElements(), T(0));
      std::fill_n(b->flat<T>().data(), b->NumElements(), T(0));
    }
    T* dh = dh_tensor->flat<T>().data();
    T* dfb = dfb_tensor->NumElements() ? dfb_tensor->flat<T>().data() : nullptr;
    if (dfb) std::fill_n(dfb, dfb_tensor->NumElements(), T(0));
    if (tw.batch == 0) return;
    const int64_t w0 = widths_[0], wk = widths_.back();
    const bool square_to_one = widths_ == std::vector<int64_t>{kLanes<T>, kLanes<T>, 1};
    // Non-temporal stores for dh need 64-byte aligned rows.
    const bool stream = reinterpret_cast<uintptr_t>(dh) % 64 == 0 && (tw.in_width() * sizeof(T)) % 64 == 0;
    int64_t flops = 0;
    for (int64_t l = 1; l <= layers; ++l) flops += widths_[l - 1] * widths_[l];
    // Every block transposed once (W.T row-major), for the input gradients.
    std::vector<std::vector<T>> transposed(layers);
    for (int64_t l = 1; l <= layers; ++l) {
      if (widths_[l] > 1) transposed[l - 1].resize(towers_ * widths_[l - 1] * widths_[l]);
    }
    ForUnits(context, towers_, 6 * tw.batch * (flops + widths_[0]), [&](int64_t first, int64_t last) {
      for (int64_t l = 1; l <= layers; ++l) {
        const int64_t in = widths_[l - 1], out = widths_[l];
        if (out == 1) continue;
        for (int64_t t = first; t < last; ++t) {
          const T* w = tw.weights[l - 1] + t * in * out;
          T* wt = transposed[l - 1].data() + t * in * out;
          for (int64_t i = 0; i < in; ++i) {
            for (int64_t j = 0; j < out; ++j) wt[j * in + i] = w[i * out + j];
          }
        }
      }
      Scratch<T> s(tw);
      // Rows outer, towers inner: each row of h and dh is read and written
      // along its length; the thread's towers' gradients stay in L2.
      for (int64_t r0 = 0; r0 < tw.batch; r0 += kRows) {
        for (int64_t t = first; t < last; ++t) {
          const int64_t rows = std::min(kRows, tw.batch - r0);
          if (square_to_one && rows == kRows) {
            BackwardSquareToOne(tw, t, r0, dy, transposed[0].data(), s.a[0].data(), s.grad.data(), dh, stream, dfb,
                                dw[0], db[0], dw[1], db[1]);
            continue;
          }
          Forward(tw, t, r0, rows, s, /*last=*/false);  // the output's own value is not needed
          // grad = dL/dz_k, then walked back layer by layer.
          T* grad = s.grad.data();
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t j = 0; j < wk; ++j) grad[r * wk + j] = dy[(r0 + r) * tw.out_width() + t * wk + j];
          }
          for (int64_t l = layers; l >= 1; --l) {
            const int64_t in = widths_[l - 1], out = widths_[l];
            const T* w = tw.weights[l - 1] + t * in * out;
            T* dwt = dw[l - 1] + t * in * out;
            if (db[l - 1]) AddRows(grad, out, rows, db[l - 1] + t * out);
            const T* a = s.a[l - 1].data();
            AddOuter(a, in, grad, out, rows, dwt);
            // next = grad @ W.T, through W's transpose so the inner loop runs along a row.
            if (out == 1 && in == kLanes<T>) {
              const Vector<T> wv = Load(w);
              for (int64_t r = 0; r < rows; ++r) Store(s.next.data() + r * in, grad[r] * wv);
            } else if (out == 1) {
              for (int64_t r = 0; r < rows; ++r) {
                const T g = grad[r];
                T* __restrict o = s.next.data() + r * in;
#pragma omp simd
                for (int64_t i = 0; i < in; ++i) o[i] = g * w[i];
              }
            } else {
              Product(grad, out, transposed[l - 1].data() + t * in * out, static_cast<const T*>(nullptr), in, rows,
                      s.next.data());
            }
            if (tw.relu) {
              ReluGrad(s.z[l - 1].data(), s.next.data(), rows * in, grad);
            } else {
              std::copy_n(s.next.data(), rows * in, grad);
            }
          }
          // grad = dL/dh for these rows.
          CopyRows(grad, w0, rows, dh + r0 * tw.in_width() + t * w0, tw.in_width(), /*stream=*/true);
          if (dfb) AddRows(grad, w0, rows, dfb + t * w0);
        }
      }
#ifdef __AVX512F__
      _mm_sfence();  // this thread's streamed lines are visible before it reports done
#endif
    });
  }

};

}  // namespace

#define SPARSELAYERS_REGISTER_TOWER(T)                                                                    \
  REGISTER_KERNEL_BUILDER(                                                                                \
      Name("SparselayersTowerForward").Device(DEVICE_CPU).TypeConstraint<T>("T"), TowerForwardOp<T>);    \
  REGISTER_KERNEL_BUILDER(                                                                                \
      Name("SparselayersTowerBackward").Device(DEVICE_CPU).TypeConstraint<T>("T"), TowerBackwardOp<T>);

SPARSELAYERS_REGISTER_TOWER(float)
SPARSELAYERS_REGISTER_TOWER(double)

}  // namespace sparselayers
