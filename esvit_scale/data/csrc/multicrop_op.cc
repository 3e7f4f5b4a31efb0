// EsvitMultiCrop: the whole per-crop EsViT augmentation as one DALI CPU operator (a plugin that
// esvit_scale/data/dali_plugin.py compiles and loads; dali_pipeline.py uses it on the CPU).
//
//   fn.esvit_multi_crop(images, params, sizes=[...], columns=[...], mean=[...], std=[...])
//
// images: decoded HWC uint8 RGB; params: each sample's (num_crops, num_params) float32 rows drawn by
// dali_params.draw_sample; `columns` gives the offsets of ROI, A, B, V, W, COLOUR, BLUR, SIGMA, SOLARIZE in a
// row. One CHW float32 output per crop. Per crop, the steps and roundings of the stock DALI graph:
//   1. the crop window resized bicubically with antialiasing, as Pillow computes it (the reference's
//      torchvision resized_crop on a PIL image: the window is cut out, then resized, so taps never read
//      outside it): horizontal pass, then vertical pass, each rounded and saturated to 0..255;
//   2. colour (COLOUR set): out = A x + b + v (w . mean(x)), rounded and saturated;
//   3. Gaussian blur (BLUR set): radius ceil(3 sigma), edge pixels repeated, horizontal then vertical pass,
//      each rounded;
//   4. solarisation (SOLARIZE set): x >= 128 -> 255 - x;
//   5. (x - 255 mean) / (255 std), written mirrored when the window's x ends are swapped (x0 > x1).
// Values stay integers in 0..255 (held as float) between steps, i.e. uint8 semantics. Work items are
// (sample, crop) pairs on DALI's thread pool, so the threads stay busy whichever ops a crop needs; every pass
// works on vectors of 8 floats (one AVX register when built with -mavx2).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dali/pipeline/operator/operator.h"

namespace esvit {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
constexpr int kLanes = 8;

inline v8f load(const float *p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float *p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f splat(float x) { return v8f{} + x; }

// Saturate to 0..255 and round half up: Pillow's clip8, DALI's float -> uint8 conversion.
inline v8f round_u8(v8f x) {
  x = x < 0.f ? splat(0.f) : x;
  x = x > 255.f ? splat(255.f) : x;
  return __builtin_convertvector(__builtin_convertvector(x + 0.5f, v8i), v8f);
}

inline int round_up(int x) { return (x + kLanes - 1) / kLanes * kLanes; }

// Pillow's bicubic filter (a = -0.5).
inline double bicubic(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// Taps of one axis, `in` pixels -> `out` pixels: Pillow's precompute_coeffs (support scaled when reducing).
struct Axis {
  std::vector<int> lo, n;   // first input pixel and tap count of each output pixel
  std::vector<float> w;     // `ksize` taps per output pixel
  int ksize = 0;

  void set(int in, int out) {
    double scale = double(in) / out, fscale = std::max(scale, 1.0), support = 2.0 * fscale;
    ksize = int(std::ceil(support)) * 2 + 1;
    lo.assign(out, 0);
    n.assign(out, 0);
    w.assign(size_t(out) * ksize, 0.f);
    std::vector<double> k(ksize);
    for (int i = 0; i < out; i++) {
      double center = (i + 0.5) * scale, sum = 0.0;
      int a = std::max(int(center - support + 0.5), 0), b = std::min(int(center + support + 0.5), in);
      for (int x = a; x < b; x++) sum += k[x - a] = bicubic((x - center + 0.5) / fscale);
      for (int x = a; x < b; x++) w[size_t(i) * ksize + x - a] = float(sum != 0.0 ? k[x - a] / sum : 0.0);
      lo[i] = a;
      n[i] = b - a;
    }
  }
};

// Horizontal taps regrouped per block of 8 output pixels: one 8-wide weight vector per input pixel of the
// block's span (zero where that input is outside an output's taps), so a block is `span` vector FMAs.
struct Blocks {
  std::vector<int> start, len, off;
  std::vector<v8f> w;

  void set(const Axis &ax, int out) {
    start.clear(); len.clear(); off.clear(); w.clear();
    for (int xb = 0; xb < out; xb += kLanes) {
      int last = std::min(xb + kLanes, out) - 1, s = ax.lo[xb], e = ax.lo[last] + ax.n[last];
      start.push_back(s);
      len.push_back(e - s);
      off.push_back(int(w.size()));
      w.resize(w.size() + (e - s), v8f{});
      for (int j = 0; xb + j <= last; j++)
        for (int t = 0; t < ax.n[xb + j]; t++)
          w[off.back() + ax.lo[xb + j] - s + t][j] = ax.w[size_t(xb + j) * ax.ksize + t];
    }
  }
};

struct Scratch {
  Axis ax, ay;
  Blocks bx;
  std::vector<float> row, tmp, img, aux;
};

struct Columns {
  int roi, a, b, v, w, colour, blur, sigma, solarize;
};

// 1. Resized crop of the window [top, top + wh) x [left, left + ww) into img: 3 planes of S x Sp.
void resize_window(const uint8_t *image, int W, int top, int left, int wh, int ww, int S, Scratch &s) {
  const int Sp = round_up(S);
  s.ax.set(ww, S);
  s.ay.set(wh, S);
  s.bx.set(s.ax, S);
  const int r0 = s.ay.lo[0], r1 = s.ay.lo[S - 1] + s.ay.n[S - 1], rows = r1 - r0;
  s.row.resize(size_t(ww) * 3);
  s.tmp.resize(size_t(3) * rows * Sp);
  for (int r = 0; r < rows; r++) {                       // horizontal pass over the rows the vertical needs
    const uint8_t *src = image + (size_t(top + r0 + r) * W + left) * 3;
    for (int i = 0; i < ww * 3; i++) s.row[i] = src[i];
    for (size_t b = 0; b < s.bx.start.size(); b++) {
      const float *p = s.row.data() + size_t(s.bx.start[b]) * 3;
      const v8f *w = s.bx.w.data() + s.bx.off[b];
      v8f r_ = v8f{}, g_ = v8f{}, b_ = v8f{};
      for (int t = 0; t < s.bx.len[b]; t++, p += 3) {
        r_ += p[0] * w[t];
        g_ += p[1] * w[t];
        b_ += p[2] * w[t];
      }
      float *dst = s.tmp.data() + size_t(r) * Sp + b * kLanes;
      store(dst, round_u8(r_));
      store(dst + size_t(rows) * Sp, round_u8(g_));
      store(dst + size_t(2) * rows * Sp, round_u8(b_));
    }
  }
  s.img.resize(size_t(3) * S * Sp);
  for (int c = 0; c < 3; c++) {                          // vertical pass
    const float *plane = s.tmp.data() + size_t(c) * rows * Sp;
    for (int y = 0; y < S; y++) {
      const float *w = s.ay.w.data() + size_t(y) * s.ay.ksize;
      const float *src = plane + size_t(s.ay.lo[y] - r0) * Sp;
      float *dst = s.img.data() + (size_t(c) * S + y) * Sp;
      for (int x = 0; x < Sp; x += kLanes) {
        v8f acc = v8f{};
        for (int t = 0; t < s.ay.n[y]; t++) acc += w[t] * load(src + size_t(t) * Sp + x);
        store(dst + x, round_u8(acc));
      }
    }
  }
}

// 2. out = A x + b + v (w . mean(x)), x the crop's RGB, mean over its S x S pixels.
void colour(const float *prm, const Columns &col, int S, Scratch &s) {
  const int Sp = round_up(S);
  float *pl[3] = {s.img.data(), s.img.data() + size_t(S) * Sp, s.img.data() + size_t(2) * S * Sp};
  double dot = 0.0;
  for (int c = 0; c < 3; c++) {
    double sum = 0.0;
    for (int y = 0; y < S; y++) {
      float row = 0.f;
      for (int x = 0; x < S; x++) row += pl[c][size_t(y) * Sp + x];
      sum += row;
    }
    dot += prm[col.w + c] * (sum / (double(S) * S));
  }
  const float *A = prm + col.a;
  float t[3];
  for (int c = 0; c < 3; c++) t[c] = float(prm[col.b + c] + prm[col.v + c] * dot);
  for (size_t i = 0; i < size_t(S) * Sp; i += kLanes) {
    v8f r = load(pl[0] + i), g = load(pl[1] + i), b = load(pl[2] + i);
    for (int c = 0; c < 3; c++)
      store(pl[c] + i, round_u8(A[3 * c] * r + A[3 * c + 1] * g + A[3 * c + 2] * b + t[c]));
  }
}

// 3. Separable Gaussian blur, taps as dali_params.blur_taps, edge pixels repeated; img -> aux -> img.
void blur(float sigma, int S, Scratch &s) {
  const int Sp = round_up(S), R = int(std::ceil(3.0 * double(sigma))), K = 2 * R + 1;
  std::vector<float> taps(K);
  double sum = 0.0;
  std::vector<double> g(K);
  for (int k = 0; k < K; k++) sum += g[k] = std::exp(-double(k - R) * (k - R) / (2.0 * sigma * sigma));
  for (int k = 0; k < K; k++) taps[k] = float(g[k] / sum);
  s.aux.resize(size_t(3) * S * Sp);
  s.row.resize(size_t(Sp) + 2 * R);
  for (int cy = 0; cy < 3 * S; cy++) {                   // horizontal, row by row (all 3 planes)
    const float *src = s.img.data() + size_t(cy) * Sp;
    float *pad = s.row.data();
    for (int i = 0; i < Sp + 2 * R; i++) pad[i] = src[std::clamp(i - R, 0, S - 1)];
    float *dst = s.aux.data() + size_t(cy) * Sp;
    for (int x = 0; x < Sp; x += kLanes) {
      v8f acc = v8f{};
      for (int k = 0; k < K; k++) acc += taps[k] * load(pad + x + k);
      store(dst + x, round_u8(acc));
    }
  }
  for (int c = 0; c < 3; c++) {                          // vertical
    const float *plane = s.aux.data() + size_t(c) * S * Sp;
    for (int y = 0; y < S; y++) {
      float *dst = s.img.data() + (size_t(c) * S + y) * Sp;
      for (int x = 0; x < Sp; x += kLanes) {
        v8f acc = v8f{};
        for (int k = 0; k < K; k++) acc += taps[k] * load(plane + size_t(std::clamp(y + k - R, 0, S - 1)) * Sp + x);
        store(dst + x, round_u8(acc));
      }
    }
  }
}

// 4. PIL's ImageOps.solarize(threshold=128).
void solarize(int S, Scratch &s) {
  for (size_t i = 0; i < size_t(3) * S * round_up(S); i += kLanes) {
    v8f x = load(s.img.data() + i);
    store(s.img.data() + i, x >= 128.f ? 255.f - x : x);
  }
}

// 5. Normalise into the CHW output, mirrored when flipped.
void normalise(float *out, int S, bool flip, const float *mean255, const float *inv_std255, Scratch &s) {
  const int Sp = round_up(S);
  for (int c = 0; c < 3; c++)
    for (int y = 0; y < S; y++) {
      const float *src = s.img.data() + (size_t(c) * S + y) * Sp;
      float *dst = out + (size_t(c) * S + y) * S;
      const float m = mean255[c], k = inv_std255[c];
      if (flip)
        for (int x = 0; x < S; x++) dst[S - 1 - x] = (src[x] - m) * k;
      else
        for (int x = 0; x < S; x++) dst[x] = (src[x] - m) * k;
    }
}

void one_crop(const uint8_t *image, int H, int W, const float *prm, const Columns &col, int S,
              const float *mean255, const float *inv_std255, float *out) {
  static thread_local Scratch s;
  const float *roi = prm + col.roi;                      // y0, x0, y1, x1; x0 > x1: flipped
  const bool flip = roi[1] > roi[3];
  int top = std::clamp(int(std::lround(roi[0])), 0, H - 1);
  int left = std::clamp(int(std::lround(std::min(roi[1], roi[3]))), 0, W - 1);
  int bottom = std::clamp(int(std::lround(roi[2])), top + 1, H);
  int right = std::clamp(int(std::lround(std::max(roi[1], roi[3]))), left + 1, W);
  resize_window(image, W, top, left, bottom - top, right - left, S, s);
  if (prm[col.colour] > 0.5f) colour(prm, col, S, s);
  if (prm[col.blur] > 0.5f && prm[col.sigma] > 0.f) blur(prm[col.sigma], S, s);
  if (prm[col.solarize] > 0.5f) solarize(S, s);
  normalise(out, S, flip, mean255, inv_std255, s);
}

class MultiCrop : public dali::Operator<dali::CPUBackend> {
 public:
  explicit MultiCrop(const dali::OpSpec &spec)
      : dali::Operator<dali::CPUBackend>(spec), sizes_(spec.GetRepeatedArgument<int>("sizes")) {
    auto c = spec.GetRepeatedArgument<int>("columns");
    auto mean = spec.GetRepeatedArgument<float>("mean"), std = spec.GetRepeatedArgument<float>("std");
    DALI_ENFORCE(c.size() == 9, "columns: 9 offsets (roi, a, b, v, w, colour, blur, sigma, solarize)");
    DALI_ENFORCE(mean.size() == 3 && std.size() == 3, "mean and std: 3 values each");
    cols_ = {c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]};
    min_params_ = 1 + std::max({c[0] + 3, c[1] + 8, c[2] + 2, c[3] + 2, c[4] + 2, c[5], c[6], c[7], c[8]});
    for (int i = 0; i < 3; i++) {
      mean255_[i] = 255.f * mean[i];
      inv_std255_[i] = 1.f / (255.f * std[i]);
    }
    for (int size : sizes_) DALI_ENFORCE(size >= 1, "sizes must be >= 1");
  }

 protected:
  bool SetupImpl(std::vector<dali::OutputDesc> &outs, const dali::Workspace &ws) override {
    const auto &images = ws.Input<dali::CPUBackend>(0);
    const auto &params = ws.Input<dali::CPUBackend>(1);
    const int n = images.num_samples(), crops = int(sizes_.size());
    DALI_ENFORCE(images.type() == DALI_UINT8, "images: uint8 expected");
    DALI_ENFORCE(params.type() == DALI_FLOAT, "params: float32 expected");
    for (int i = 0; i < n; i++) {
      const auto &sh = images.tensor_shape(i), &ps = params.tensor_shape(i);
      DALI_ENFORCE(sh.size() == 3 && sh[2] == 3 && sh[0] >= 1 && sh[1] >= 1, "images: HWC RGB expected");
      DALI_ENFORCE(ps.size() == 2 && ps[0] == crops && ps[1] >= min_params_,
                   "params: one row per crop with every column expected");
    }
    outs.resize(crops);
    for (int c = 0; c < crops; c++)
      outs[c] = {dali::uniform_list_shape(n, {3, sizes_[c], sizes_[c]}), DALI_FLOAT};
    return true;
  }

  void RunImpl(dali::Workspace &ws) override {
    const auto &images = ws.Input<dali::CPUBackend>(0);
    const auto &params = ws.Input<dali::CPUBackend>(1);
    auto &pool = ws.GetThreadPool();
    const int crops = int(sizes_.size());
    for (int i = 0; i < images.num_samples(); i++) {
      const uint8_t *image = images.tensor<uint8_t>(i);
      const int H = int(images.tensor_shape(i)[0]), W = int(images.tensor_shape(i)[1]);
      for (int c = 0; c < crops; c++) {
        const float *prm = params.tensor<float>(i) + size_t(c) * params.tensor_shape(i)[1];
        float *out = ws.Output<dali::CPUBackend>(c).mutable_tensor<float>(i);
        const int S = sizes_[c];
        pool.AddWork([this, image, H, W, prm, out, S](int) {
          one_crop(image, H, W, prm, cols_, S, mean255_, inv_std255_, out);
        }, int64_t(S) * S);
      }
    }
    pool.RunAll();
    for (int c = 0; c < crops; c++) ws.Output<dali::CPUBackend>(c).SetLayout("CHW");
  }

 private:
  std::vector<int> sizes_;
  Columns cols_{};
  int min_params_ = 0;
  float mean255_[3], inv_std255_[3];
};

}  // namespace esvit

DALI_REGISTER_OPERATOR(EsvitMultiCrop, ::esvit::MultiCrop, ::dali::CPU);

DALI_SCHEMA(EsvitMultiCrop)
    .DocStr("EsViT's per-crop augmentation (resized crop, colour, blur, solarisation, normalisation) of "
            "decoded images; one CHW float32 output per crop (see esvit_scale/data/csrc/multicrop_op.cc).")
    .NumInput(2)
    .OutputFn([](const dali::OpSpec &spec) { return int(spec.GetRepeatedArgument<int>("sizes").size()); })
    .AddArg("sizes", "Output side of each crop.", DALI_INT_VEC)
    .AddArg("columns", "Offsets of roi, a, b, v, w, colour, blur, sigma, solarize in a parameter row.",
            DALI_INT_VEC)
    .AddArg("mean", "Per-channel mean in 0..1.", DALI_FLOAT_VEC)
    .AddArg("std", "Per-channel standard deviation in 0..1.", DALI_FLOAT_VEC);
