// Direct sparse convolution for sparselayers (Park et al., ICLR 2017): the
// image is read in place, never copied into patches.
//
// Positions run over the padded grid of every image, (batch, grid_h,
// grid_w) in C order; a kernel tap moves a stride-1 output position i to the
// input position i + shift, shift = tap_h * dilation_h * grid_w + tap_w *
// dilation_w. Work goes tile by tile of consecutive positions: a tile of the
// channels_last source is transposed into a small (channels, positions)
// buffer that stays in cache, every pattern entry adds its value times its
// shifted source row into register accumulators, and the result is
// transposed back into the channels_last destination. Positions of the grid
// with no output (past the output size, the padding) are computed in the
// buffer and not written.
//
// geometry = [height, width, grid_h, grid_w, pad_top, pad_left, out_h, out_w, reach]
// (a 1-D convolution has height 1), reach = the largest shift.
//
// SparselayersConvForward:   y[f, i] = bias[f] + sum_{s in column f} values[s] * x[c_s, i + shift_s]
// SparselayersConvInputGrad: dx[c, j] = sum_{s in channel c} values[s] * dy[f_s, j - shift_s]
// SparselayersConvValuesGrad: dvalues[s] = sum_i dy[f_s, i] * x[c_s, i + shift_s], dbias[f] = sum_i dy[f, i]
// Entries come grouped by output row (filter or channel) through `pointers`
// over the group's `index` (the other side's row), `shift`, and `order`, the
// canonical place of each entry in `values`.

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

namespace {

struct Geometry {
  int64_t height, width, grid_h, grid_w, pad_top, pad_left, out_h, out_w, reach;
};

absl::Status ReadGeometry(const std::vector<int64_t>& g, Geometry* out) {
  if (g.size() != 9) return absl::InvalidArgumentError("geometry must have 9 entries");
  *out = {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]};
  if (out->height < 1 || out->width < 1 || out->out_h < 1 || out->out_w < 1 || out->pad_top < 0 || out->pad_left < 0 ||
      out->grid_h < out->height + out->pad_top || out->grid_w < out->width + out->pad_left ||
      out->grid_h < out->out_h || out->grid_w < out->out_w || out->reach < 0 ||
      out->reach >= out->grid_h * out->grid_w) {
    return absl::InvalidArgumentError("inconsistent geometry");
  }
  return absl::OkStatus();
}

// The attributes every conv op has: its geometry and its source blocks.
absl::Status ReadAttributes(OpKernelConstruction* context, Geometry* geometry, int64_t* blocks) {
  std::vector<int64_t> g;
  TF_RETURN_IF_ERROR(context->GetAttr("geometry", &g));
  TF_RETURN_IF_ERROR(ReadGeometry(g, geometry));
  return context->GetAttr("blocks", blocks);
}

// The forward op's and the input gradient's output: (batch, spatial, rows),
// the output's spatial size going forward, the input's coming back, and one
// row per entry of `pointers` but the last, per block.
absl::Status ShiftedSumShape(si::InferenceContext* c, bool forward) {
  std::vector<int64_t> g;
  TF_RETURN_IF_ERROR(c->GetAttr("geometry", &g));
  Geometry geo;
  TF_RETURN_IF_ERROR(ReadGeometry(g, &geo));
  int64_t blocks;
  TF_RETURN_IF_ERROR(c->GetAttr("blocks", &blocks));
  si::DimensionHandle rows;
  TF_RETURN_IF_ERROR(c->Subtract(c->Dim(c->input(2), 0), 1, &rows));
  TF_RETURN_IF_ERROR(c->Divide(rows, blocks, /*evenly_divisible=*/true, &rows));
  c->set_output(0, c->MakeShape({c->Dim(c->input(0), 0), forward ? geo.out_h : geo.height,
                                 forward ? geo.out_w : geo.width, rows}));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("SparselayersConvForward")
    .Input("x: T")
    .Input("values: T")
    .Input("pointers: int64")
    .Input("index: int32")
    .Input("shift: int32")
    .Input("order: int32")
    .Input("bias: T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("geometry: list(int)")
    .Attr("blocks: int >= 1 = 1")
    .SetShapeFn([](si::InferenceContext* c) { return ShiftedSumShape(c, /*forward=*/true); });

REGISTER_OP("SparselayersConvInputGrad")
    .Input("dy: T")
    .Input("values: T")
    .Input("pointers: int64")
    .Input("index: int32")
    .Input("shift: int32")
    .Input("order: int32")
    .Output("dx: T")
    .Attr("T: {float, double}")
    .Attr("geometry: list(int)")
    .Attr("blocks: int >= 1 = 1")
    .SetShapeFn([](si::InferenceContext* c) { return ShiftedSumShape(c, /*forward=*/false); });

REGISTER_OP("SparselayersConvValuesGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("pointers: int64")
    .Input("index: int32")
    .Input("shift: int32")
    .Input("order: int32")
    .Output("dvalues: T")
    .Output("dbias: T")
    .Attr("T: {float, double}")
    .Attr("geometry: list(int)")
    .Attr("blocks: int >= 1 = 1")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->Vector(c->Dim(c->input(3), 0)));
      c->set_output(1, c->Vector(c->Dim(c->input(0), 3)));
      return absl::OkStatus();
    });

namespace {


// A channels_last tensor (batch, height, width, channels) placed at
// (top, left) of the padded grid.
template <typename T>
struct Placed {
  T* data;
  int64_t batch, height, width, channels, top, left;
};

// Positions transposed together: each buffer row gets a whole cache line
// at a time while the group's source rows stay in L1.
constexpr int64_t kGroup = 16;

// to[i][to_at + j] = from[j][from_at + i] for i, j < kGroup: a 16 x 16
// block transposed in AVX-512 registers for float (4 rounds of shuffles),
// element by element otherwise.
template <typename T>
inline void Transpose16(const T* const* from, int64_t from_at, T* const* to, int64_t to_at) {
  for (int64_t i = 0; i < kGroup; ++i) {
    for (int64_t j = 0; j < kGroup; ++j) to[i][to_at + j] = from[j][from_at + i];
  }
}

#ifdef __AVX512F__
template <>
inline void Transpose16<float>(const float* const* from, int64_t from_at, float* const* to, int64_t to_at) {
  __m512 r[16], t[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(from[j] + from_at);
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {
    r[j] = _mm512_shuffle_ps(t[j], t[j + 2], 0x44);
    r[j + 1] = _mm512_shuffle_ps(t[j], t[j + 2], 0xEE);
    r[j + 2] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0x44);
    r[j + 3] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
    t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xDD);
    t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
    t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xDD);
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(to[i] + to_at, r[i]);
}
#endif

// Where grid position `pos` lies in the placed tensor, or nullptr.
template <typename T>
T* Locate(const Placed<T>& t, const Geometry& g, int64_t pos) {
  const int64_t per_image = g.grid_h * g.grid_w;
  if (pos < 0 || pos >= t.batch * per_image) return nullptr;
  const int64_t n = pos / per_image, r = pos % per_image;
  const int64_t h = r / g.grid_w - t.top, w = r % g.grid_w - t.left;
  if (h < 0 || h >= t.height || w < 0 || w >= t.width) return nullptr;
  return t.data + ((n * t.height + h) * t.width + w) * t.channels;
}

// buffer[c * ld + k] = the tensor at grid position start + k (zero outside
// it), k < count; `zeros` holds t.channels zeros.
template <typename T>
void ReadTile(const Placed<const T>& t, const Geometry& g, int64_t start, int64_t count, T* buffer, int64_t ld,
              const T* zeros) {
  const T* rows[kGroup];
  for (int64_t k = 0; k < count; k += kGroup) {
    const int64_t n = std::min(kGroup, count - k);
    for (int64_t j = 0; j < n; ++j) {
      const T* at = Locate(t, g, start + k + j);
      rows[j] = at ? at : zeros;
    }
    int64_t c = 0;
    if (n == kGroup) {
      T* lines[kGroup];
      for (; c + kGroup <= t.channels; c += kGroup) {
        for (int64_t i = 0; i < kGroup; ++i) lines[i] = buffer + (c + i) * ld + k;
        Transpose16(rows, c, lines, 0);
      }
    }
    for (; c < t.channels; ++c) {
      T* line = buffer + c * ld + k;
      for (int64_t j = 0; j < n; ++j) line[j] = rows[j][c];
    }
  }
}

// The tensor at grid positions start + k, k < count, where it has one =
// buffer[c * ld + k]; `scratch` (t.channels numbers) takes the rest.
template <typename T>
void WriteTile(const Placed<T>& t, const Geometry& g, int64_t start, int64_t count, const T* buffer, int64_t ld,
               T* scratch) {
  T* rows[kGroup];
  for (int64_t k = 0; k < count; k += kGroup) {
    const int64_t n = std::min(kGroup, count - k);
    for (int64_t j = 0; j < n; ++j) {
      T* at = Locate(t, g, start + k + j);
      rows[j] = at ? at : scratch;
    }
    int64_t c = 0;
    if (n == kGroup) {
      const T* lines[kGroup];
      for (; c + kGroup <= t.channels; c += kGroup) {
        for (int64_t i = 0; i < kGroup; ++i) lines[i] = buffer + (c + i) * ld + k;
        Transpose16(lines, 0, rows, c);
      }
    }
    for (; c < t.channels; ++c) {
      const T* line = buffer + c * ld + k;
      for (int64_t j = 0; j < n; ++j) rows[j][c] = line[j];
    }
  }
}

// Positions of one register tile: eight vectors of accumulators, enough
// independent sums to keep both FMA units busy.
template <typename T>
constexpr int64_t kTile = 8 * kLanes<T>;

// out[k] (+)= sum_s value[s] * src[offset[s] + k], k < kTile<T>, accumulated in registers
// (added to out's own numbers when `accumulate`).
template <typename T>
void AddTile(T* __restrict out, const T* __restrict src, const int64_t* __restrict offset, const T* __restrict value,
             int64_t first, int64_t end, bool accumulate) {
  constexpr int64_t L = kLanes<T>;
  Vector<T> a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
  if (accumulate) {
    a0 = Load(out), a1 = Load(out + L), a2 = Load(out + 2 * L), a3 = Load(out + 3 * L);
    a4 = Load(out + 4 * L), a5 = Load(out + 5 * L), a6 = Load(out + 6 * L), a7 = Load(out + 7 * L);
  }
  for (int64_t s = first; s < end; ++s) {
    const T v = value[s];
    const T* x = src + offset[s];
    a0 += v * Load(x);
    a1 += v * Load(x + L);
    a2 += v * Load(x + 2 * L);
    a3 += v * Load(x + 3 * L);
    a4 += v * Load(x + 4 * L);
    a5 += v * Load(x + 5 * L);
    a6 += v * Load(x + 6 * L);
    a7 += v * Load(x + 7 * L);
  }
  const Vector<T> sums[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
  std::memcpy(out, sums, sizeof(sums));
}

template <typename T>
void AddEdge(T* __restrict out, const T* __restrict src, const int64_t* __restrict offset, const T* __restrict value,
             int64_t first, int64_t end, int64_t n, bool accumulate) {
  if (!accumulate) std::fill(out, out + n, T(0));
  for (int64_t s = first; s < end; ++s) {
    const T v = value[s];
    const T* __restrict x = src + offset[s];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] += v * x[k];
  }
}

// out[j] = the sum of v_j's lanes, j < 4: per lane for any T, a tree of
// halving adds and horizontal adds for float with AVX-512 (13 instructions
// instead of 60 scalar ones: Dot4 sums once per entry and tile).
template <typename T>
void Sum4(const Vector<T>& v0, const Vector<T>& v1, const Vector<T>& v2, const Vector<T>& v3, T* out) {
  out[0] = LaneSum<T>(v0), out[1] = LaneSum<T>(v1), out[2] = LaneSum<T>(v2), out[3] = LaneSum<T>(v3);
}

#ifdef __AVX512F__
inline __m256 Halves(const Vector<float>& v) {
  const __m512 x = reinterpret_cast<const __m512&>(v);
  return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}

template <>
inline void Sum4<float>(const Vector<float>& v0, const Vector<float>& v1, const Vector<float>& v2,
                        const Vector<float>& v3, float* out) {
  const __m256 both = _mm256_hadd_ps(_mm256_hadd_ps(Halves(v0), Halves(v1)), _mm256_hadd_ps(Halves(v2), Halves(v3)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1)));
}
#endif

// out[j] += dot(a, b_j) over n positions, j < 4, in vector registers.
template <typename T>
void Dot4(const T* __restrict a, const T* __restrict b0, const T* __restrict b1, const T* __restrict b2,
          const T* __restrict b3, int64_t n, T* out) {
  constexpr int64_t L = kLanes<T>;
  // Two sums per entry (even and odd vectors): eight independent chains
  // keep both FMA units busy through their latency.
  Vector<T> acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {}, odd0 = {}, odd1 = {}, odd2 = {}, odd3 = {};
  int64_t k = 0;
  for (; k + 2 * L <= n; k += 2 * L) {
    const Vector<T> x = Load<T>(a + k), y = Load<T>(a + k + L);
    acc0 += x * Load(b0 + k);
    acc1 += x * Load(b1 + k);
    acc2 += x * Load(b2 + k);
    acc3 += x * Load(b3 + k);
    odd0 += y * Load(b0 + k + L);
    odd1 += y * Load(b1 + k + L);
    odd2 += y * Load(b2 + k + L);
    odd3 += y * Load(b3 + k + L);
  }
  acc0 += odd0, acc1 += odd1, acc2 += odd2, acc3 += odd3;
  for (; k + L <= n; k += L) {
    const Vector<T> x = Load<T>(a + k);
    acc0 += x * Load(b0 + k);
    acc1 += x * Load(b1 + k);
    acc2 += x * Load(b2 + k);
    acc3 += x * Load(b3 + k);
  }
  T tail0 = 0, tail1 = 0, tail2 = 0, tail3 = 0;
  for (; k < n; ++k) {
    tail0 += a[k] * b0[k];
    tail1 += a[k] * b1[k];
    tail2 += a[k] * b2[k];
    tail3 += a[k] * b3[k];
  }
  T sums[4];
  Sum4<T>(acc0, acc1, acc2, acc3, sums);
  out[0] += sums[0] + tail0;
  out[1] += sums[1] + tail1;
  out[2] += sums[2] + tail2;
  out[3] += sums[3] + tail3;
}

// Positions per tile: several times the reach (each tile reads its reach
// again) and a buffer of at most ~256 KiB per side.
template <typename T>
int64_t TileLength(const Geometry& g, int64_t rows) {
  const int64_t wanted = std::max<int64_t>(4 * g.reach, 256);
  const int64_t fit = (256 * 1024) / (static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(rows, 1));
  return std::max<int64_t>(kTile<T>, std::min(wanted, fit) / kTile<T> * kTile<T>);
}

absl::Status CheckTable(const Tensor& pointers, const Tensor& index, const Tensor& shift, const Tensor& order,
                        int64_t source_rows, int64_t reach) {
  if (pointers.dims() != 1 || pointers.NumElements() < 1 || index.dims() != 1 || shift.dims() != 1 ||
      order.dims() != 1) {
    return absl::InvalidArgumentError("pointers, index, shift and order must be vectors, pointers non-empty");
  }
  const int64_t nnz = index.NumElements();
  if (shift.NumElements() != nnz || order.NumElements() != nnz) {
    return absl::InvalidArgumentError("shift and order must have one entry per index");
  }
  const auto p = pointers.flat<int64_t>();
  const int64_t rows = pointers.NumElements() - 1;
  if (p(0) != 0 || p(rows) != nnz) return absl::InvalidArgumentError("pointers must run from 0 to the number of entries");
  for (int64_t r = 0; r < rows; ++r) {
    if (p(r + 1) < p(r)) return absl::InvalidArgumentError("pointers must not decrease");
  }
  const auto idx = index.flat<int32_t>();
  const auto sh = shift.flat<int32_t>();
  const auto o = order.flat<int32_t>();
  for (int64_t s = 0; s < nnz; ++s) {
    if (idx(s) < 0 || idx(s) >= source_rows) return absl::InvalidArgumentError(absl::StrCat("index out of range at ", s));
    if (sh(s) < 0 || sh(s) > reach) return absl::InvalidArgumentError(absl::StrCat("shift out of range at ", s));
    if (o(s) < 0 || o(s) >= nnz) return absl::InvalidArgumentError(absl::StrCat("order out of range at ", s));
  }
  return absl::OkStatus();
}

// The forward pass and the input gradient: out = sum of shifted source rows.
template <typename T>
class ShiftedSumOp : public OpKernel {
 public:
  // forward: the source is x at the padding's corner, the output y at the
  // grid's corner, the source tile starts at the tile. Else (the input
  // gradient) the source is dy at the corner, the output dx at the
  // padding's corner, and the source tile starts `reach` before the tile.
  ShiftedSumOp(OpKernelConstruction* context, bool forward) : OpKernel(context), forward_(forward) {
    OP_REQUIRES_OK(context, ReadAttributes(context, &geometry_, &blocks_));
  }

  void Compute(OpKernelContext* context) override {
    const Geometry& g = geometry_;
    const int64_t blocks = blocks_;
    const Tensor& source = context->input(0);
    const Tensor& values = context->input(1);
    const Tensor& pointers = context->input(2);
    const Tensor& index = context->input(3);
    const Tensor& shift = context->input(4);
    const Tensor& order = context->input(5);
    OP_REQUIRES(context, source.dims() == 4, absl::InvalidArgumentError("the source must have rank 4"));
    const int64_t batch = source.dim_size(0);
    const int64_t in_h = forward_ ? g.height : g.out_h, in_w = forward_ ? g.width : g.out_w;
    OP_REQUIRES(context, source.dim_size(1) == in_h && source.dim_size(2) == in_w,
                absl::InvalidArgumentError(absl::StrCat("the source's spatial shape must be ", in_h, " x ", in_w)));
    const int64_t source_rows = source.dim_size(3);
    OP_REQUIRES_OK(context, CheckTable(pointers, index, shift, order, source_rows, g.reach));
    const int64_t nnz = index.NumElements();
    OP_REQUIRES(context, values.NumElements() == nnz, absl::InvalidArgumentError("values must have one entry per index"));
    OP_REQUIRES(context, (pointers.NumElements() - 1) % blocks == 0,
                absl::InvalidArgumentError("pointers must have one entry per block and row, plus one"));
    const int64_t rows = (pointers.NumElements() - 1) / blocks;
    // The forward pass adds the bias (empty: none) to every output row.
    const T* bias = nullptr;
    if (forward_) {
      const Tensor& b = context->input(6);
      OP_REQUIRES(context, b.dims() == 1 && (b.NumElements() == 0 || b.NumElements() == rows),
                  absl::InvalidArgumentError("bias must be empty or have one entry per filter"));
      if (b.NumElements() > 0) bias = b.flat<T>().data();
    }
    const int64_t out_h = forward_ ? g.out_h : g.height, out_w = forward_ ? g.out_w : g.width;
    Tensor* out_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, out_h, out_w, rows}), &out_tensor));
    if (out_tensor->NumElements() == 0) return;
    std::vector<T> value(nnz);
    const T* v = values.flat<T>().data();
    const int32_t* ord = order.flat<int32_t>().data();
    for (int64_t s = 0; s < nnz; ++s) value[s] = v[ord[s]];
    const int64_t tile = TileLength<T>(g, std::max(rows, source_rows));
    const int64_t ld = tile + g.reach;
    std::vector<int64_t> offset(nnz);
    const int32_t* idx = index.flat<int32_t>().data();
    const int32_t* sh = shift.flat<int32_t>().data();
    for (int64_t s = 0; s < nnz; ++s) offset[s] = idx[s] * ld + sh[s];
    const Placed<const T> src{source.flat<T>().data(), batch, in_h, in_w, source_rows,
                              forward_ ? g.pad_top : 0, forward_ ? g.pad_left : 0};
    const Placed<T> dst{out_tensor->flat<T>().data(), batch, out_h, out_w, rows,
                        forward_ ? 0 : g.pad_top, forward_ ? 0 : g.pad_left};
    const int64_t positions = batch * g.grid_h * g.grid_w;
    const int64_t tiles = (positions + tile - 1) / tile;
    const int64_t* p = pointers.flat<int64_t>().data();
    ForUnits(context, tiles, (nnz + (rows + source_rows) * 4) * tile, [&](int64_t first, int64_t last) {
      std::vector<T> in(source_rows * ld), out(rows * tile), zeros(source_rows, T(0)), scratch(rows);
      for (int64_t t = first; t < last; ++t) {
        const int64_t start = t * tile, count = std::min(tile, positions - start);
        ReadTile(src, g, forward_ ? start : start - g.reach, count + g.reach, in.data(), ld, zeros.data());
        // Block by block of source rows, so that the rows one block reads
        // stay in L1 while every output row takes its entries from them.
        for (int64_t b = 0; b < blocks; ++b) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t first = p[b * rows + r], end = p[b * rows + r + 1];
            if (b > 0 && first == end) continue;
            T* o = out.data() + r * tile;
            int64_t k = 0;
            for (; k + kTile<T> <= count; k += kTile<T>) {
              AddTile<T>(o + k, in.data() + k, offset.data(), value.data(), first, end, b > 0);
            }
            if (k < count) AddEdge<T>(o + k, in.data() + k, offset.data(), value.data(), first, end, count - k, b > 0);
          }
        }
        if (bias != nullptr) {
          for (int64_t r = 0; r < rows; ++r) {
            T* __restrict o = out.data() + r * tile;
            const T add = bias[r];
#pragma omp simd
            for (int64_t k = 0; k < count; ++k) o[k] += add;
          }
        }
        WriteTile(dst, g, start, count, out.data(), tile, scratch.data());
      }
    });
  }

 private:
  const bool forward_;
  Geometry geometry_;
  int64_t blocks_;
};

template <typename T>
class ConvForwardOp : public ShiftedSumOp<T> {
 public:
  explicit ConvForwardOp(OpKernelConstruction* context) : ShiftedSumOp<T>(context, true) {}
};

template <typename T>
class ConvInputGradOp : public ShiftedSumOp<T> {
 public:
  explicit ConvInputGradOp(OpKernelConstruction* context) : ShiftedSumOp<T>(context, false) {}
};

template <typename T>
class ConvValuesGradOp : public OpKernel {
 public:
  explicit ConvValuesGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ReadAttributes(context, &geometry_, &blocks_));
  }

  void Compute(OpKernelContext* context) override {
    const Geometry& g = geometry_;
    const int64_t blocks = blocks_;
    const Tensor& dy = context->input(0);
    const Tensor& x = context->input(1);
    const Tensor& pointers = context->input(2);
    const Tensor& index = context->input(3);
    const Tensor& shift = context->input(4);
    const Tensor& order = context->input(5);
    OP_REQUIRES(context, dy.dims() == 4 && x.dims() == 4, absl::InvalidArgumentError("dy and x must have rank 4"));
    OP_REQUIRES(context, dy.dim_size(0) == x.dim_size(0), absl::InvalidArgumentError("dy and x must share the batch"));
    OP_REQUIRES(context, dy.dim_size(1) == g.out_h && dy.dim_size(2) == g.out_w && x.dim_size(1) == g.height &&
                             x.dim_size(2) == g.width,
                absl::InvalidArgumentError("dy and x must have the geometry's spatial shapes"));
    const int64_t filters = dy.dim_size(3), channels = x.dim_size(3);
    OP_REQUIRES(context, pointers.NumElements() == blocks * filters + 1,
                absl::InvalidArgumentError("pointers must have one entry per block and filter, plus one"));
    OP_REQUIRES_OK(context, CheckTable(pointers, index, shift, order, channels, g.reach));
    const int64_t nnz = index.NumElements();
    Tensor* out_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({nnz}), &out_tensor));
    T* out = out_tensor->flat<T>().data();
    std::fill(out, out + nnz, T(0));
    // The bias gradient: dy summed over its positions.
    Tensor* bias_tensor = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({filters}), &bias_tensor));
    T* dbias = bias_tensor->flat<T>().data();
    std::fill(dbias, dbias + filters, T(0));
    const int64_t batch = x.dim_size(0);
    if (batch == 0 || filters == 0) return;
    const int64_t tile = TileLength<T>(g, std::max(filters, channels));
    const int64_t ld = tile + g.reach;
    std::vector<int64_t> offset(nnz);
    const int32_t* idx = index.flat<int32_t>().data();
    const int32_t* sh = shift.flat<int32_t>().data();
    for (int64_t s = 0; s < nnz; ++s) offset[s] = idx[s] * ld + sh[s];
    const Placed<const T> dy_at{dy.flat<T>().data(), batch, g.out_h, g.out_w, filters, 0, 0};
    const Placed<const T> x_at{x.flat<T>().data(), batch, g.height, g.width, channels, g.pad_top, g.pad_left};
    const int64_t positions = batch * g.grid_h * g.grid_w;
    const int64_t tiles = (positions + tile - 1) / tile;
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    // Parts of the tiles run in parallel, each into its own partial sums.
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(tiles, 4 * workers->num_threads));
    const int64_t per_part = (tiles + parts - 1) / parts;
    std::vector<T> partial(parts * (nnz + filters), T(0));
    const int64_t* p = pointers.flat<int64_t>().data();
    ForUnits(context, parts, (nnz + (filters + channels) * 4) * tile * per_part, [&](int64_t first, int64_t last) {
      std::vector<T> a(filters * tile), b(channels * ld), zeros(std::max(filters, channels), T(0));
      for (int64_t part = first; part < last; ++part) {
        T* sums = partial.data() + part * (nnz + filters);
        T* bias_sums = sums + nnz;
        for (int64_t t = part * per_part; t < std::min(tiles, (part + 1) * per_part); ++t) {
          const int64_t start = t * tile, count = std::min(tile, positions - start);
          ReadTile(dy_at, g, start, count, a.data(), tile, zeros.data());
          // Positions without an output read as zeros.
          for (int64_t f = 0; f < filters; ++f) {
            const T* __restrict row = a.data() + f * tile;
            T total = 0;
#pragma omp simd reduction(+ : total)
            for (int64_t k = 0; k < count; ++k) total += row[k];
            bias_sums[f] += total;
          }
          if (nnz == 0) continue;
          ReadTile(x_at, g, start, count + g.reach, b.data(), ld, zeros.data());
          for (int64_t bf = 0; bf < blocks * filters; ++bf) {
            const T* row = a.data() + (bf % filters) * tile;
            int64_t s = p[bf];
            const int64_t end = p[bf + 1];
            for (; s + 4 <= end; s += 4) {
              Dot4(row, b.data() + offset[s], b.data() + offset[s + 1], b.data() + offset[s + 2], b.data() + offset[s + 3],
                   count, sums + s);
            }
            for (; s < end; ++s) sums[s] += Dot(row, b.data() + offset[s], count);
          }
        }
      }
    });
    const int32_t* ord = order.flat<int32_t>().data();
    for (int64_t s = 0; s < nnz; ++s) {
      T total = 0;
      for (int64_t part = 0; part < parts; ++part) total += partial[part * (nnz + filters) + s];
      out[ord[s]] = total;
    }
    for (int64_t f = 0; f < filters; ++f) {
      for (int64_t part = 0; part < parts; ++part) dbias[f] += partial[part * (nnz + filters) + nnz + f];
    }
  }

 private:
  Geometry geometry_;
  int64_t blocks_;
};

}  // namespace

#define SPARSELAYERS_REGISTER_CONV(T)                                                                     \
  REGISTER_KERNEL_BUILDER(                                                                                \
      Name("SparselayersConvForward").Device(DEVICE_CPU).TypeConstraint<T>("T"), ConvForwardOp<T>);      \
  REGISTER_KERNEL_BUILDER(                                                                                \
      Name("SparselayersConvInputGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), ConvInputGradOp<T>);  \
  REGISTER_KERNEL_BUILDER(                                                                                \
      Name("SparselayersConvValuesGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), ConvValuesGradOp<T>);

SPARSELAYERS_REGISTER_CONV(float)
SPARSELAYERS_REGISTER_CONV(double)

}  // namespace sparselayers
