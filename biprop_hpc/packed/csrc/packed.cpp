// Packed binary inference kernels for MPT-1/1 networks (biprop_hpc.packed).
//
// Activations a in {-1,+1} are bits (1 = -1), packed along the channels: a map of N x H x W pixels
// with C channels is int64 words [N, H, W, Cw], Cw = ceil(C / 64), channel c is bit c % 64 of word
// c / 64 (channels past C are 0 bits). A ternary weight W_eff in {-alpha, 0, +alpha} is a sign bit
// s (1 = negative) and a mask bit m (1 = kept). For one output channel and one output position:
//
//     d = sum over kept taps of a * sign(w) = popcount(m) - 2 * popcount((a XOR s) AND m)
//
// and the layer's output is alpha * d: exact integer arithmetic. Taps that fall into the zero
// padding of the float model contribute 0 there. Here they read 0 bits (a = +1), so they add
// sign(w) of every kept weight of the tap; a table B[class][o] = popcount(m[o]) - that sum, per
// class of output positions that see the same padded taps, removes it exactly: d = B - 2 * popc.
//
// Weights are held compressed: the mask bits, and the sign bits of the kept weights only
// ((1 + keep ratio) bits per weight); each call expands the signs with PDEP into a scratch panel.
//
// CPU paths, chosen at run time (__builtin_cpu_supports) or forced (set_cpu_path / the
// BIPROP_PACKED_CPU environment variable): "avx512" (AVX-512F + VPOPCNTDQ: 8 popcounts per
// instruction, VPTERNLOG for (a ^ s) & m), "avx2" (nibble-table popcount with VPSHUFB, VPSADBW),
// "scalar" (portable C++). All paths compute the same integers. Threads: at::parallel_for
// (torch's intra-op pool; torch.set_num_threads controls it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace biprop_packed {

using u64 = uint64_t;
using i64 = int64_t;

// ------------------------------------------------------------------ CPU paths
enum Path : int { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
const char* const PATH_NAMES[] = {"scalar", "avx2", "avx512"};

bool cpu_supports(int path) {
  __builtin_cpu_init();
  switch (path) {
    case PATH_SCALAR: return true;
    case PATH_AVX2: return __builtin_cpu_supports("avx2");
    case PATH_AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
    default: return false;
  }
}

bool cpu_has_bmi2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("bmi2");
}

int best_path() {
  for (int p = PATH_AVX512; p > PATH_SCALAR; --p)
    if (cpu_supports(p)) return p;
  return PATH_SCALAR;
}

int path_from_name(const std::string& name) {
  if (name == "auto" || name.empty()) return best_path();
  for (int p = 0; p < 3; ++p)
    if (name == PATH_NAMES[p]) {
      TORCH_CHECK(cpu_supports(p), "biprop packed: this CPU does not support the '", name, "' path");
      return p;
    }
  TORCH_CHECK(false, "biprop packed: unknown CPU path '", name, "' (auto, avx512, avx2, scalar)");
  return PATH_SCALAR;
}

int initial_path() {
  const char* env = std::getenv("BIPROP_PACKED_CPU");
  return path_from_name(env ? std::string(env) : std::string("auto"));
}

std::atomic<int>& current_path() {
  static std::atomic<int> path{initial_path()};
  return path;
}

// Portable popcount (SWAR); without -mpopcnt, __builtin_popcount is a library call, far slower.
inline int popc64(u64 x) {
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
  return static_cast<int>((x * 0x0101010101010101ULL) >> 56);
}

// ------------------------------------------------------------------ weights: expand compressed signs
u64 pdep_portable(u64 src, u64 mask) {
  u64 out = 0;
  for (; mask; mask &= mask - 1, src >>= 1)
    if (src & 1) out |= mask & (~mask + 1);
  return out;
}

__attribute__((target("bmi2"))) u64 pdep_bmi2(u64 src, u64 mask) { return _pdep_u64(src, mask); }

inline u64 read_bits(const u64* stream, i64 pos) {  // 64 bits from bit position pos (higher ones: garbage)
  const i64 w = pos >> 6;
  const int sh = static_cast<int>(pos & 63);
  u64 v = stream[w] >> sh;
  if (sh) v |= stream[w + 1] << (64 - sh);
  return v;
}

__attribute__((target("bmi2,popcnt"))) void expand_block_bmi2(const u64* m, const u64* stream, i64 pos, i64 words,
                                                               u64* out) {
  // m: [Kw][16] mask words of one block of 16 output channels; out: [Kw][32] = 16 sign, 16 mask words
  for (i64 k = 0; k < words / 16; ++k) {
    for (int j = 0; j < 16; ++j) {
      const u64 mask = m[k * 16 + j];
      out[k * 32 + j] = _pdep_u64(read_bits(stream, pos), mask);
      out[k * 32 + 16 + j] = mask;
      pos += __builtin_popcountll(mask);
    }
  }
}

void expand_block_portable(const u64* m, const u64* stream, i64 pos, i64 words, u64* out) {
  for (i64 k = 0; k < words / 16; ++k) {
    for (int j = 0; j < 16; ++j) {
      const u64 mask = m[k * 16 + j];
      out[k * 32 + j] = pdep_portable(read_bits(stream, pos), mask);
      out[k * 32 + 16 + j] = mask;
      pos += popc64(mask);
    }
  }
}

// mask_panel [nob, Kw, 16], sign_stream (kept signs in panel order, one spare word), offsets [nob + 1]
// (bit offsets of each block's signs) -> panel [nob, Kw, 32] (per k: 16 sign words, then 16 mask words).
void expand_weights(const at::Tensor& mask_panel, const at::Tensor& sign_stream, const at::Tensor& offsets,
                    u64* out, bool portable) {
  const i64 nob = mask_panel.size(0), Kw = mask_panel.size(1);
  const u64* m = reinterpret_cast<const u64*>(mask_panel.data_ptr<i64>());
  const u64* s = reinterpret_cast<const u64*>(sign_stream.data_ptr<i64>());
  const i64* off = offsets.data_ptr<i64>();
  const bool bmi2 = !portable && cpu_has_bmi2();
  at::parallel_for(0, nob, 1, [&](i64 b, i64 e) {
    for (i64 ob = b; ob < e; ++ob) {
      if (bmi2)
        expand_block_bmi2(m + ob * Kw * 16, s, off[ob], Kw * 16, out + ob * Kw * 32);
      else
        expand_block_portable(m + ob * Kw * 16, s, off[ob], Kw * 16, out + ob * Kw * 32);
    }
  });
}

// ------------------------------------------------------------------ GEMM tiles
constexpr int OB = 16;    // output channels per block (one uint16 of output bits)
constexpr int TP = 96;    // output positions per tile (rows of the bit im2col)

enum Mode : int { MODE_INT = 0, MODE_FLOAT = 1, MODE_BITS = 2 };

struct Epilogue {
  int mode;
  i64 O;                 // real output channels
  i64 out_words;         // output words per position (bits mode)
  float alpha;
  const int16_t* thr;    // [2 or 4][Opad]: lo, hi (rows 2-3: where the residual bit is set); neg iff d < lo or d > hi
  i64 Opad;
  const uint16_t* resid; // residual bits [P][out_words * 4] (uint16 view) or null
  void* out;
};

// Scalar epilogue for `rows` positions of one block: acc[r][16] popcounts, B rows per position.
inline void epilogue_scalar(const Epilogue& ep, const i64* acc, int rows, i64 p0, i64 ob,
                            const int16_t* const* brow) {
  for (int r = 0; r < rows; ++r) {
    const i64 p = p0 + r;
    const int16_t* B = brow[r] + ob * OB;
    if (ep.mode == MODE_BITS) {
      const uint16_t res = ep.resid ? ep.resid[p * ep.out_words * 4 + ob] : 0;
      uint16_t bits = 0;
      for (int j = 0; j < OB; ++j) {
        const i64 o = ob * OB + j;
        const int32_t d = B[j] - 2 * static_cast<int32_t>(acc[r * OB + j]);
        const int set = (res >> j) & 1;
        const int32_t lo = ep.thr[(2 * set) * ep.Opad + o], hi = ep.thr[(2 * set + 1) * ep.Opad + o];  // int16
        if (d < lo || d > hi) bits |= static_cast<uint16_t>(1u << j);
      }
      reinterpret_cast<uint16_t*>(ep.out)[p * ep.out_words * 4 + ob] = bits;
    } else {
      for (int j = 0; j < OB; ++j) {
        const i64 o = ob * OB + j;
        if (o >= ep.O) break;
        const int32_t d = B[j] - 2 * static_cast<int32_t>(acc[r * OB + j]);
        if (ep.mode == MODE_FLOAT)
          reinterpret_cast<float*>(ep.out)[p * ep.O + o] = static_cast<float>(d) * ep.alpha;
        else
          reinterpret_cast<int32_t*>(ep.out)[p * ep.O + o] = d;
      }
    }
  }
}

// ---- portable
void tile_scalar(const u64* A, i64 lda, int rows, const u64* Wp, i64 Kw, i64* acc) {
  for (int r = 0; r < rows; ++r) {
    i64 sum[OB] = {0};
    const u64* a = A + r * lda;
    for (i64 k = 0; k < Kw; ++k) {
      const u64 x = a[k];
      const u64* w = Wp + k * 32;
      for (int j = 0; j < OB; ++j) sum[j] += popc64((x ^ w[j]) & w[16 + j]);
    }
    for (int j = 0; j < OB; ++j) acc[r * OB + j] = sum[j];
  }
}

// ---- AVX2: popcount of 64-bit lanes by nibble lookup (VPSHUFB) and byte sums (VPSADBW)
constexpr int R2 = 2;
template <int R>
__attribute__((target("avx2"))) void tile_avx2_r(const u64* A, i64 lda, const u64* Wp, i64 Kw, i64* acc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i sum[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) sum[r][q] = zero;
  for (i64 k = 0; k < Kw; ++k) {
    const u64* w = Wp + k * 32;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256i a = _mm256_set1_epi64x(static_cast<long long>(A[r * lda + k]));
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 4 * q));
        const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 + 4 * q));
        const __m256i x = _mm256_and_si256(_mm256_xor_si256(a, s), m);
        const __m256i lo = _mm256_and_si256(x, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
        const __m256i c = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
        sum[r][q] = _mm256_add_epi64(sum[r][q], _mm256_sad_epu8(c, zero));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * OB + 4 * q), sum[r][q]);
}

void tile_avx2(const u64* A, i64 lda, int rows, const u64* Wp, i64 Kw, i64* acc) {
  int r = 0;
  for (; r + R2 <= rows; r += R2) tile_avx2_r<R2>(A + r * lda, lda, Wp, Kw, acc + r * OB);
  for (; r < rows; ++r) tile_avx2_r<1>(A + r * lda, lda, Wp, Kw, acc + r * OB);
}

// ---- AVX-512 VPOPCNTDQ: R positions x 16 channels in 2R accumulators, fused vectorised epilogue
constexpr int R5 = 6;
__attribute__((target("avx512f"))) inline __m512i load16(const int16_t* p) {
  return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <int R>
__attribute__((target("avx512f,avx512vpopcntdq"))) inline void
tile_avx512_r(const u64* A, i64 lda, const u64* Wp, i64 Kw, const Epilogue& ep, i64 p0, i64 ob,
              const int16_t* const* brow) {
  __m512i sum[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) sum[r][0] = sum[r][1] = _mm512_setzero_si512();
  for (i64 k = 0; k < Kw; ++k) {
    const u64* w = Wp + k * 32;
    const __m512i s0 = _mm512_loadu_si512(w), s1 = _mm512_loadu_si512(w + 8);
    const __m512i m0 = _mm512_loadu_si512(w + 16), m1 = _mm512_loadu_si512(w + 24);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi64(static_cast<long long>(A[r * lda + k]));
      // imm 0x28: (a ^ s) & m
      sum[r][0] = _mm512_add_epi64(sum[r][0], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(a, s0, m0, 0x28)));
      sum[r][1] = _mm512_add_epi64(sum[r][1], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(a, s1, m1, 0x28)));
    }
  }
  const i64 o0 = ob * OB;
  const __mmask16 omask = ep.O - o0 >= OB ? static_cast<__mmask16>(0xffff)
                                          : static_cast<__mmask16>((1u << (ep.O - o0)) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const i64 p = p0 + r;
    const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(sum[r][0])),
                                         _mm512_cvtepi64_epi32(sum[r][1]), 1);
    const __m512i B = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(brow[r] + o0)));
    const __m512i d = _mm512_sub_epi32(B, _mm512_slli_epi32(c, 1));
    if (ep.mode == MODE_BITS) {
      __m512i lo = load16(ep.thr + o0), hi = load16(ep.thr + ep.Opad + o0);
      if (ep.resid) {
        const __mmask16 res = ep.resid[p * ep.out_words * 4 + ob];
        lo = _mm512_mask_blend_epi32(res, lo, load16(ep.thr + 2 * ep.Opad + o0));
        hi = _mm512_mask_blend_epi32(res, hi, load16(ep.thr + 3 * ep.Opad + o0));
      }
      const __mmask16 neg = _mm512_cmplt_epi32_mask(d, lo) | _mm512_cmpgt_epi32_mask(d, hi);
      reinterpret_cast<uint16_t*>(ep.out)[p * ep.out_words * 4 + ob] = static_cast<uint16_t>(neg);
    } else if (ep.mode == MODE_FLOAT) {
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(ep.alpha));
      _mm512_mask_storeu_ps(reinterpret_cast<float*>(ep.out) + p * ep.O + o0, omask, f);
    } else {
      _mm512_mask_storeu_epi32(reinterpret_cast<int32_t*>(ep.out) + p * ep.O + o0, omask, d);
    }
  }
}

void tile_avx512(const u64* A, i64 lda, int rows, const u64* Wp, i64 Kw, const Epilogue& ep, i64 p0,
                 i64 ob, const int16_t* const* brow) {
  int r = 0;
  for (; r + R5 <= rows; r += R5) tile_avx512_r<R5>(A + r * lda, lda, Wp, Kw, ep, p0 + r, ob, brow + r);
  switch (rows - r) {
    case 5: tile_avx512_r<5>(A + r * lda, lda, Wp, Kw, ep, p0 + r, ob, brow + r); break;
    case 4: tile_avx512_r<4>(A + r * lda, lda, Wp, Kw, ep, p0 + r, ob, brow + r); break;
    case 3: tile_avx512_r<3>(A + r * lda, lda, Wp, Kw, ep, p0 + r, ob, brow + r); break;
    case 2: tile_avx512_r<2>(A + r * lda, lda, Wp, Kw, ep, p0 + r, ob, brow + r); break;
    case 1: tile_avx512_r<1>(A + r * lda, lda, Wp, Kw, ep, p0 + r, ob, brow + r); break;
    default: break;
  }
}

// ------------------------------------------------------------------ the binary convolution
struct Geometry {
  i64 N, H, W, Cw, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, Kw;
};

// Bit im2col of positions [p0, p0 + rows): row i = the Kw words (tap-major, Cw words per tap) of position
// p0 + i; taps in the padding read 0 words.
void im2col(const u64* x, const Geometry& g, i64 p0, int rows, u64* out) {
  const i64 HWo = g.Ho * g.Wo;
  for (int i = 0; i < rows; ++i) {
    const i64 p = p0 + i, n = p / HWo, rem = p % HWo, oy = rem / g.Wo, ox = rem % g.Wo;
    u64* row = out + i * g.Kw;
    for (i64 ky = 0; ky < g.kh; ++ky) {
      const i64 iy = oy * g.sh - g.ph + ky * g.dh;
      for (i64 kx = 0; kx < g.kw; ++kx, row += g.Cw) {
        const i64 ix = ox * g.sw - g.pw + kx * g.dw;
        if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W)
          std::memset(row, 0, g.Cw * sizeof(u64));
        else
          std::memcpy(row, x + ((n * g.H + iy) * g.W + ix) * g.Cw, g.Cw * sizeof(u64));
      }
    }
  }
}

// x: bits [N, H, W, Cw]; weights compressed (mask_panel [nob, Kw, 16], sign_stream, offsets [nob+1]);
// btab [classes, Opad] int16 (popcount(m) minus the padding correction), cls_y [Ho], cls_x [Wo] (class =
// cls_y * ncx + cls_x); geometry = (kh, kw, sh, sw, ph, pw, dh, dw); mode 0: int32 d [N, Ho, Wo, O],
// 1: float32 alpha * d [N, Ho, Wo, O], 2: bits [N, Ho, Wo, ceil(O / 64)] by thresholds thr int16 [2|4, Opad]
// (with residual bits [N, Ho, Wo, ceil(O / 64)] choosing rows 2-3 where a residual bit is set).
at::Tensor binary_conv(const at::Tensor& x, const at::Tensor& mask_panel, const at::Tensor& sign_stream,
                       const at::Tensor& offsets, i64 O, at::IntArrayRef geometry, const at::Tensor& btab,
                       const at::Tensor& cls_y, const at::Tensor& cls_x, i64 ncx, i64 mode, double alpha,
                       const at::Tensor& thr, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dtype() == at::kLong && x.dim() == 4 && x.is_contiguous(), "x: contiguous int64 [N, H, W, Cw]");
  TORCH_CHECK(geometry.size() == 8, "geometry: (kh, kw, sh, sw, ph, pw, dh, dw)");
  TORCH_CHECK(mask_panel.dtype() == at::kLong && mask_panel.dim() == 3 && mask_panel.size(2) == OB &&
                  mask_panel.is_contiguous(), "mask_panel: int64 [nob, Kw, 16]");
  TORCH_CHECK(sign_stream.dtype() == at::kLong && sign_stream.is_contiguous(), "sign_stream: int64");
  TORCH_CHECK(offsets.dtype() == at::kLong && offsets.numel() == mask_panel.size(0) + 1, "offsets: [nob + 1]");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), geometry[0], geometry[1], geometry[2], geometry[3],
             geometry[4], geometry[5], geometry[6], geometry[7], 0, 0, 0};
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.Kw = g.kh * g.kw * g.Cw;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "binary_conv: empty output");
  const i64 nob = mask_panel.size(0), Opad = nob * OB;
  TORCH_CHECK(mask_panel.size(1) == g.Kw, "binary_conv: weights have ", mask_panel.size(1),
              " words per output channel, the input gives ", g.Kw);
  TORCH_CHECK(O > 0 && O <= Opad && O > Opad - OB, "binary_conv: O does not match the weight blocks");
  TORCH_CHECK(btab.dtype() == at::kShort && btab.dim() == 2 && btab.size(1) == Opad && btab.is_contiguous(),
              "btab: int16 [classes, Opad]");
  TORCH_CHECK(cls_y.dtype() == at::kInt && cls_y.numel() == g.Ho && cls_x.dtype() == at::kInt &&
                  cls_x.numel() == g.Wo, "cls_y/cls_x: int32 [Ho]/[Wo]");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode: 0 int, 1 float, 2 bits");
  const i64 out_words = (O + 63) / 64;
  const i64 P = g.N * g.Ho * g.Wo;
  at::Tensor out;
  if (mode == MODE_BITS) {
    TORCH_CHECK(thr.dtype() == at::kShort && thr.dim() == 2 && (thr.size(0) == 2 || thr.size(0) == 4) &&
                    thr.size(1) == Opad && thr.is_contiguous(), "thr: int16 [2 or 4, Opad]");
    out = at::empty({g.N, g.Ho, g.Wo, out_words}, x.options());
  } else {
    out = at::empty({g.N, g.Ho, g.Wo, O}, x.options().dtype(mode == MODE_FLOAT ? at::kFloat : at::kInt));
  }
  const uint16_t* resid = nullptr;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(mode == MODE_BITS, "a residual needs the bits mode");
    TORCH_CHECK(residual->dtype() == at::kLong && residual->is_contiguous() &&
                    residual->sizes() == out.sizes(), "residual: int64 bits shaped like the output");
    TORCH_CHECK(thr.size(0) == 4, "a residual needs 4 threshold rows");
    resid = reinterpret_cast<const uint16_t*>(residual->data_ptr<i64>());
  }
  const int path = current_path().load();
  Epilogue ep{static_cast<int>(mode), O, out_words, static_cast<float>(alpha),
              mode == MODE_BITS ? thr.data_ptr<int16_t>() : nullptr, Opad, resid, out.data_ptr()};

  // expand the signs of the compressed weights: panel [nob][Kw][32]
  thread_local std::vector<u64> panel_buffer;
  panel_buffer.resize(static_cast<size_t>(nob * g.Kw * 32));
  u64* panel = panel_buffer.data();
  expand_weights(mask_panel, sign_stream, offsets, panel, path == PATH_SCALAR);

  const u64* xb = reinterpret_cast<const u64*>(x.data_ptr<i64>());
  const bool direct = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  const int16_t* bt = btab.data_ptr<int16_t>();
  const int32_t* cy = cls_y.data_ptr<int32_t>();
  const int32_t* cx = cls_x.data_ptr<int32_t>();
  const i64 ntiles = (P + TP - 1) / TP;
  const i64 threads = at::get_num_threads();
  i64 ngroups = 1;
  if (ntiles < 4 * threads) ngroups = std::min<i64>(nob, (4 * threads + ntiles - 1) / ntiles);
  const i64 per_group = (nob + ngroups - 1) / ngroups;
  ngroups = (nob + per_group - 1) / per_group;

  at::parallel_for(0, ntiles * ngroups, 1, [&](i64 begin, i64 end) {
    thread_local std::vector<u64> abuf;
    if (!direct) abuf.resize(static_cast<size_t>(TP * g.Kw));
    i64 last_tile = -1;
    const int16_t* brow[TP];
    i64 acc[TP * OB];
    for (i64 item = begin; item < end; ++item) {
      const i64 tile = item / ngroups, group = item % ngroups;
      const i64 p0 = tile * TP;
      const int rows = static_cast<int>(std::min<i64>(TP, P - p0));
      const u64* A;
      i64 lda;
      if (direct) {
        A = xb + p0 * g.Cw;
        lda = g.Cw;
      } else {
        if (tile != last_tile) im2col(xb, g, p0, rows, abuf.data());
        A = abuf.data();
        lda = g.Kw;
      }
      if (tile != last_tile) {
        const i64 HWo = g.Ho * g.Wo;
        for (int i = 0; i < rows; ++i) {
          const i64 rem = (p0 + i) % HWo;
          brow[i] = bt + (static_cast<i64>(cy[rem / g.Wo]) * ncx + cx[rem % g.Wo]) * Opad;
        }
      }
      last_tile = tile;
      const i64 ob_end = std::min(nob, (group + 1) * per_group);
      for (i64 ob = group * per_group; ob < ob_end; ++ob) {
        const u64* Wp = panel + ob * g.Kw * 32;
        if (path == PATH_AVX512) {
          tile_avx512(A, lda, rows, Wp, g.Kw, ep, p0, ob, brow);
        } else {
          if (path == PATH_AVX2)
            tile_avx2(A, lda, rows, Wp, g.Kw, acc);
          else
            tile_scalar(A, lda, rows, Wp, g.Kw, acc);
          epilogue_scalar(ep, acc, rows, p0, ob, brow);
        }
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------ activations <-> bits
// Float -> bits with per-channel thresholds: bit (= -1) unless lo[c] <= x <= hi[c] (NaN -> 1). The sign
// activation (x >= 0 -> +1, NaN -> -1 as in BinaryActivation) is lo = 0, hi = +inf; BN followed by the
// sign is a pair (lo, hi) found at conversion (see layers.float_thresholds).
// x: float32 [N, C, H, W] (NCHW or channels_last) or [N, C] -> bits int64 [N, H, W, Cw].

// rows of C channels (channels_last or [N, C]): 16 channels per compare
__attribute__((target("avx512f"))) void pack_rows_avx512_range(const float* x, i64 b, i64 e, i64 C,
                                                                const float* lo, const float* hi, u64* out) {
  const i64 Cw = (C + 63) / 64;
  for (i64 p = b; p < e; ++p) {
    const float* row = x + p * C;
    uint16_t* o = reinterpret_cast<uint16_t*>(out + p * Cw);
    for (i64 q = 0; q < Cw * 4; ++q) {
      const i64 c0 = q * 16;
      if (c0 >= C) { o[q] = 0; continue; }
      const __mmask16 valid = C - c0 >= 16 ? static_cast<__mmask16>(0xffff)
                                           : static_cast<__mmask16>((1u << (C - c0)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, row + c0);
      const __m512 l = _mm512_maskz_loadu_ps(valid, lo + c0), h = _mm512_maskz_loadu_ps(valid, hi + c0);
      const __mmask16 pos = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(v, l, _CMP_GE_OQ), v, h, _CMP_LE_OQ);
      o[q] = static_cast<uint16_t>(valid & ~pos);
    }
  }
}

void pack_rows_avx512(const float* x, i64 rows, i64 C, const float* lo, const float* hi, u64* out) {
  at::parallel_for(0, rows, 16, [&](i64 b, i64 e) { pack_rows_avx512_range(x, b, e, C, lo, hi, out); });
}

// NCHW planes: 16 positions per compare, one OR per channel into 16 words
__attribute__((target("avx512f"))) void pack_planes_avx512_range(const float* x, i64 b, i64 e, i64 C, i64 HW,
                                                                  const float* lo, const float* hi, u64* out) {
  const i64 Cw = (C + 63) / 64, chunks = (HW + 15) / 16;
  alignas(64) u64 tmp[16];
  for (i64 item = b; item < e; ++item) {
    const i64 n = item / (Cw * chunks), w = (item / chunks) % Cw, s0 = (item % chunks) * 16;
    const i64 len = std::min<i64>(16, HW - s0);
    const __mmask16 valid = len == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << len) - 1);
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    const i64 c_end = std::min<i64>(64, C - w * 64);
    for (i64 c = 0; c < c_end; ++c) {
      const i64 ch = w * 64 + c;
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + (n * C + ch) * HW + s0);
      const __mmask16 pos = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(v, _mm512_set1_ps(lo[ch]), _CMP_GE_OQ), v,
                                                    _mm512_set1_ps(hi[ch]), _CMP_LE_OQ);
      const __mmask16 neg = static_cast<__mmask16>(~pos);
      const __m512i bit = _mm512_set1_epi64(static_cast<long long>(u64(1) << c));
      acc0 = _mm512_mask_or_epi64(acc0, static_cast<__mmask8>(neg & 0xff), acc0, bit);
      acc1 = _mm512_mask_or_epi64(acc1, static_cast<__mmask8>(neg >> 8), acc1, bit);
    }
    _mm512_store_si512(tmp, acc0);
    _mm512_store_si512(tmp + 8, acc1);
    for (i64 s = 0; s < len; ++s) out[(n * HW + s0 + s) * Cw + w] = tmp[s];
  }
}

void pack_planes_avx512(const float* x, i64 N, i64 C, i64 HW, const float* lo, const float* hi, u64* out) {
  const i64 Cw = (C + 63) / 64, chunks = (HW + 15) / 16;
  at::parallel_for(0, N * Cw * chunks, 8,
                   [&](i64 b, i64 e) { pack_planes_avx512_range(x, b, e, C, HW, lo, hi, out); });
}

void pack_rows_scalar(const float* x, i64 rows, i64 C, const float* lo, const float* hi, u64* out) {
  const i64 Cw = (C + 63) / 64;
  at::parallel_for(0, rows, 16, [&](i64 b, i64 e) {
    for (i64 p = b; p < e; ++p) {
      const float* row = x + p * C;
      for (i64 w = 0; w < Cw; ++w) {
        u64 bits = 0;
        const i64 c_end = std::min<i64>(64, C - w * 64);
        for (i64 c = 0; c < c_end; ++c) {
          const float v = row[w * 64 + c];
          bits |= static_cast<u64>(!(v >= lo[w * 64 + c] && v <= hi[w * 64 + c])) << c;
        }
        out[p * Cw + w] = bits;
      }
    }
  });
}

void pack_planes_scalar(const float* x, i64 N, i64 C, i64 HW, const float* lo, const float* hi, u64* out) {
  const i64 Cw = (C + 63) / 64;
  constexpr i64 CHUNK = 256;
  const i64 chunks = (HW + CHUNK - 1) / CHUNK;
  at::parallel_for(0, N * Cw * chunks, 1, [&](i64 b, i64 e) {
    u64 buf[CHUNK];
    for (i64 item = b; item < e; ++item) {
      const i64 n = item / (Cw * chunks), w = (item / chunks) % Cw, s0 = (item % chunks) * CHUNK;
      const i64 len = std::min<i64>(CHUNK, HW - s0);
      std::fill(buf, buf + len, 0);
      const i64 c_end = std::min<i64>(64, C - w * 64);
      for (i64 c = 0; c < c_end; ++c) {
        const float* plane = x + (n * C + w * 64 + c) * HW + s0;
        const float l = lo[w * 64 + c], h = hi[w * 64 + c];
        for (i64 s = 0; s < len; ++s) buf[s] |= static_cast<u64>(!(plane[s] >= l && plane[s] <= h)) << c;
      }
      for (i64 s = 0; s < len; ++s) out[(n * HW + s0 + s) * Cw + w] = buf[s];
    }
  });
}

at::Tensor pack_threshold(const at::Tensor& input, const c10::optional<at::Tensor>& lo_opt,
                          const c10::optional<at::Tensor>& hi_opt) {
  TORCH_CHECK(input.dtype() == at::kFloat, "pack: float32 input");
  TORCH_CHECK(input.dim() == 4 || input.dim() == 2, "pack: [N, C, H, W] or [N, C]");
  const i64 N = input.size(0), C = input.size(1);
  const i64 H = input.dim() == 4 ? input.size(2) : 1, W = input.dim() == 4 ? input.size(3) : 1;
  const i64 Cw = (C + 63) / 64, HW = H * W;
  at::Tensor lo, hi;
  if (lo_opt.has_value() && lo_opt->defined()) {
    TORCH_CHECK(hi_opt.has_value() && hi_opt->defined(), "pack: lo and hi together");
    lo = lo_opt->contiguous();
    hi = hi_opt->contiguous();
    TORCH_CHECK(lo.dtype() == at::kFloat && hi.dtype() == at::kFloat && lo.numel() == C && hi.numel() == C,
                "pack: lo/hi float32 [C]");
  } else {
    lo = at::zeros({C}, input.options());
    hi = at::full({C}, INFINITY, input.options());
  }
  at::Tensor out = at::empty({N, H, W, Cw}, input.options().dtype(at::kLong));
  u64* o = reinterpret_cast<u64*>(out.data_ptr<i64>());
  const bool avx512 = current_path().load() == PATH_AVX512;
  const bool rows = HW == 1 ? true
                            : input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                                  !input.is_contiguous();
  if (rows) {
    const at::Tensor x = input.dim() == 2 || HW == 1 ? input.contiguous() : input;
    if (avx512)
      pack_rows_avx512(x.data_ptr<float>(), N * HW, C, lo.data_ptr<float>(), hi.data_ptr<float>(), o);
    else
      pack_rows_scalar(x.data_ptr<float>(), N * HW, C, lo.data_ptr<float>(), hi.data_ptr<float>(), o);
  } else {
    const at::Tensor x = input.contiguous();
    if (avx512)
      pack_planes_avx512(x.data_ptr<float>(), N, C, HW, lo.data_ptr<float>(), hi.data_ptr<float>(), o);
    else
      pack_planes_scalar(x.data_ptr<float>(), N, C, HW, lo.data_ptr<float>(), hi.data_ptr<float>(), o);
  }
  return out;
}

at::Tensor pack_sign(const at::Tensor& input) { return pack_threshold(input, c10::nullopt, c10::nullopt); }

// Ternary weight from its compressed form: mask bits (1 = kept) and the sign bits of the kept weights
// (1 = negative), both little-endian bit streams in uint8 -> float32 [numel] in {-alpha, 0, +alpha}.
at::Tensor expand_ternary(const at::Tensor& mask_bytes, const at::Tensor& sign_bytes, i64 numel, double alpha) {
  TORCH_CHECK(mask_bytes.dtype() == at::kByte && sign_bytes.dtype() == at::kByte && mask_bytes.is_contiguous() &&
                  sign_bytes.is_contiguous() && mask_bytes.numel() * 8 >= numel, "expand_ternary: uint8 streams");
  at::Tensor out = at::empty({numel}, mask_bytes.options().dtype(at::kFloat));
  const uint8_t* m = mask_bytes.data_ptr<uint8_t>();
  const uint8_t* s = sign_bytes.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const i64 sign_numel = sign_bytes.numel();
  const float table[3] = {0.0f, static_cast<float>(alpha), -static_cast<float>(alpha)};
  // blocks of 512 mask bytes; each block's first sign index from a prefix count
  constexpr i64 BLOCK = 512;
  const i64 nbytes = (numel + 7) / 8, nblocks = (nbytes + BLOCK - 1) / BLOCK;
  std::vector<i64> start(nblocks + 1, 0);
  for (i64 b = 0; b < nblocks; ++b) {
    i64 count = 0;
    for (i64 i = b * BLOCK; i < std::min(nbytes, (b + 1) * BLOCK); ++i) count += popc64(m[i]);
    start[b + 1] = start[b] + count;
  }
  TORCH_CHECK(start[nblocks] <= sign_bytes.numel() * 8, "expand_ternary: sign stream too short");
  at::parallel_for(0, nblocks, 1, [&](i64 b0, i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
      i64 j = start[b];
      const i64 end = std::min(numel, (b + 1) * BLOCK * 8);
      float* __restrict dst = o;
      for (i64 i0 = b * BLOCK * 8; i0 < end; i0 += 8) {
        unsigned kept = m[i0 >> 3];
        const int n = static_cast<int>(std::min<i64>(8, end - i0));
        // the next (up to 8) sign bits, from bit j on
        const i64 byte = j >> 3;
        unsigned signs = s[byte] >> (j & 7);
        if (byte + 1 < sign_numel) signs |= static_cast<unsigned>(s[byte + 1]) << (8 - (j & 7));
        for (int k = 0; k < n; ++k) {
          const unsigned on = (kept >> k) & 1;
          dst[i0 + k] = table[on + (on & signs)];   // branch-free: random masks defeat prediction
          signs >>= on;
        }
        j += popc64(kept & ((1u << n) - 1));
      }
    }
  });
  return out;
}

// bits [N, H, W, Cw] -> float32 [N, C, H, W] of +-1 (NCHW contiguous)
at::Tensor unpack_bits(const at::Tensor& bits, i64 C) {
  TORCH_CHECK(bits.dtype() == at::kLong && bits.dim() == 4 && bits.is_contiguous(), "unpack_bits: int64 [N, H, W, Cw]");
  const i64 N = bits.size(0), H = bits.size(1), W = bits.size(2), Cw = bits.size(3), HW = H * W;
  TORCH_CHECK(C > 0 && (C + 63) / 64 == Cw, "unpack_bits: C does not match Cw");
  at::Tensor out = at::empty({N, C, H, W}, bits.options().dtype(at::kFloat));
  const u64* b = reinterpret_cast<const u64*>(bits.data_ptr<i64>());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * C, 16, [&](i64 begin, i64 end) {
    for (i64 nc = begin; nc < end; ++nc) {
      const i64 n = nc / C, c = nc % C;
      const u64* src = b + n * HW * Cw + c / 64;
      float* dst = o + nc * HW;
      for (i64 s = 0; s < HW; ++s) dst[s] = ((src[s * Cw] >> (c % 64)) & 1) ? -1.0f : 1.0f;
    }
  });
  return out;
}

// Max-pool of +-1 maps in the bit domain. `and_mask` [Cw]: channels whose pooled bit is the AND of the
// window's bits (1 = -1 iff every input is -1: the max of +-1 values, or max-pool before a non-decreasing
// map), the others the OR (max-pool before a non-increasing map such as BN with a negative scale).
// Window positions in the padding are skipped (max-pool pads with -inf).
at::Tensor bit_maxpool(const at::Tensor& bits, const at::Tensor& and_mask, at::IntArrayRef geometry) {
  TORCH_CHECK(bits.dtype() == at::kLong && bits.dim() == 4 && bits.is_contiguous(), "bit_maxpool: int64 [N, H, W, Cw]");
  TORCH_CHECK(geometry.size() == 8, "geometry: (kh, kw, sh, sw, ph, pw, dh, dw)");
  const i64 N = bits.size(0), H = bits.size(1), W = bits.size(2), Cw = bits.size(3);
  TORCH_CHECK(and_mask.dtype() == at::kLong && and_mask.numel() == Cw && and_mask.is_contiguous(),
              "and_mask: int64 [Cw]");
  const i64 kh = geometry[0], kw = geometry[1], sh = geometry[2], sw = geometry[3], ph = geometry[4],
            pw = geometry[5], dh = geometry[6], dw = geometry[7];
  const i64 Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "bit_maxpool: empty output");
  at::Tensor out = at::empty({N, Ho, Wo, Cw}, bits.options());
  const u64* b = reinterpret_cast<const u64*>(bits.data_ptr<i64>());
  const u64* am = reinterpret_cast<const u64*>(and_mask.data_ptr<i64>());
  u64* o = reinterpret_cast<u64*>(out.data_ptr<i64>());
  at::parallel_for(0, N * Ho * Wo, 16, [&](i64 begin, i64 end) {
    for (i64 p = begin; p < end; ++p) {
      const i64 n = p / (Ho * Wo), oy = (p / Wo) % Ho, ox = p % Wo;
      for (i64 w = 0; w < Cw; ++w) {
        u64 all = ~u64(0), any = 0;
        for (i64 ky = 0; ky < kh; ++ky) {
          const i64 iy = oy * sh - ph + ky * dh;
          if (iy < 0 || iy >= H) continue;
          for (i64 kx = 0; kx < kw; ++kx) {
            const i64 ix = ox * sw - pw + kx * dw;
            if (ix < 0 || ix >= W) continue;
            const u64 v = b[((n * H + iy) * W + ix) * Cw + w];
            all &= v;
            any |= v;
          }
        }
        o[p * Cw + w] = (all & am[w]) | (any & ~am[w]);
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------ control
std::string get_cpu_path() { return PATH_NAMES[current_path().load()]; }

std::string set_cpu_path(std::string name) {
  const int previous = current_path().exchange(path_from_name(name));
  return PATH_NAMES[previous];
}

std::vector<std::string> supported_cpu_paths() {
  std::vector<std::string> out;
  for (int p = 2; p >= 0; --p)
    if (cpu_supports(p)) out.push_back(PATH_NAMES[p]);
  return out;
}

}  // namespace biprop_packed

TORCH_LIBRARY(biprop_packed, m) {
  m.def("binary_conv(Tensor x, Tensor mask_panel, Tensor sign_stream, Tensor offsets, int O, int[] geometry, "
        "Tensor btab, Tensor cls_y, Tensor cls_x, int ncx, int mode, float alpha, Tensor thr, Tensor? residual) "
        "-> Tensor");
  m.def("pack_sign(Tensor x) -> Tensor");
  m.def("pack_threshold(Tensor x, Tensor? lo, Tensor? hi) -> Tensor");
  m.def("expand_ternary(Tensor mask_bytes, Tensor sign_bytes, int numel, float alpha) -> Tensor");
  m.def("unpack_bits(Tensor bits, int C) -> Tensor");
  m.def("bit_maxpool(Tensor bits, Tensor and_mask, int[] geometry) -> Tensor");
  m.def("get_cpu_path", &biprop_packed::get_cpu_path);
  m.def("set_cpu_path", &biprop_packed::set_cpu_path);
  m.def("supported_cpu_paths", &biprop_packed::supported_cpu_paths);
}

TORCH_LIBRARY_IMPL(biprop_packed, CPU, m) {
  m.impl("binary_conv", biprop_packed::binary_conv);
  m.impl("pack_sign", biprop_packed::pack_sign);
  m.impl("pack_threshold", biprop_packed::pack_threshold);
  m.impl("expand_ternary", biprop_packed::expand_ternary);
  m.impl("unpack_bits", biprop_packed::unpack_bits);
  m.impl("bit_maxpool", biprop_packed::bit_maxpool);
}
