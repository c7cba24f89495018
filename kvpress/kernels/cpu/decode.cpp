// Fused CPU decode attention for kvpress: one pass over each held byte, built by torch's extension tooling
// (kvpress/kernels/cpu_decode.py). Two entry points, each the twin of a torch path in kvpress/kernels/:
//
//   quant_decode   attention of the M query rows of each (batch, kv_head) over a packed quantized body
//                  (KIVI axes: keys per-channel in groups of G tokens, values per-token groups of channels;
//                  2/3/4/8-bit codes in int32 words, little-endian bit stream; optional GEAR outliers: a few exact
//                  entries per token row written back over the dequantized ones) and an exact full-precision
//                  segment (sinks, residual window, this step's tokens), merged by log-sum-exp. The query is
//                  rotated into the body's key basis and the body's output rotated back here, so the caller
//                  makes one call per layer. Twin of quant_decode_torch + dense_partial + merge.
//   ragged_decode  attention over heads holding different numbers of tokens (varlen layout [T, D] with
//                  segment offsets) plus an optional dense tail [B, H, n_tail, D] shared by every head.
//                  Twin of ragged_decode_torch (+ dense_partial + merge for the tail).
//
// Rows: M = (q_heads / kv_heads) * q_len; row m is query token m % L of its head. Masks are per query token.
// Work is split over (batch, kv_head, token split) with at::parallel_for (torch's intra-op threads), each split
// keeping an online softmax (running max, sum, unnormalised output) in float32; splits merge exactly.
// Head dims 64, 128 and 256 get instantiations with the dimension known at compile time (vector-extension dot
// products and accumulators held in registers across a block of tokens); other head dims run the generic loops.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int TB = 32;  // tokens per block of logits
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// A boolean mask read as ptr[l * stride_l + t * stride_t] (null: everything allowed).
struct Mask {
  const bool* ptr = nullptr;
  int64_t stride_l = 0;
  int64_t stride_t = 0;
  int64_t L = 1;
  inline bool allowed(int m, int64_t t) const {
    return ptr == nullptr || ptr[(m % L) * stride_l + t * stride_t];
  }
};

// Online-softmax state of M rows over some tokens: running max, sum and unnormalised output [M, D].
struct Partial {
  float* mx;
  float* sm;
  float* acc;
};

// Codes of one byte as floats, for 2- and 4-bit codes (built once).
template <int BITS>
const std::array<std::array<float, 8 / BITS>, 256>& byte_table() {
  static const auto table = [] {
    std::array<std::array<float, 8 / BITS>, 256> t{};
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8 / BITS; ++k) t[b][k] = static_cast<float>((b >> (BITS * k)) & ((1 << BITS) - 1));
    return t;
  }();
  return table;
}

template <int BITS>
inline void unpack_row(const int32_t* __restrict w, int D, float* __restrict out) {
  if constexpr (BITS == 3) {
    for (int i = 0; i < D; ++i) {
      const int s = 3 * i, wi = s >> 5, off = s & 31;
      const uint64_t lo = static_cast<uint32_t>(w[wi]);
      const uint64_t hi = off > 29 ? static_cast<uint64_t>(static_cast<uint32_t>(w[wi + 1])) : 0u;
      out[i] = static_cast<float>(((lo | (hi << 32)) >> off) & 7u);
    }
  } else if constexpr (BITS == 2 || BITS == 4) {
    // Byte by byte from a table (codes are a little-endian bit stream, so byte i holds codes i*PER_BYTE...):
    // one 16- or 8-byte copy per byte of codes instead of a shift and mask per code.
    constexpr int PER_BYTE = 8 / BITS;
    const auto& table = byte_table<BITS>();
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w);
    const int whole = D / PER_BYTE;
    for (int i = 0; i < whole; ++i) std::memcpy(out + i * PER_BYTE, table[bytes[i]].data(), sizeof(float) * PER_BYTE);
    for (int i = whole * PER_BYTE; i < D; ++i) {
      out[i] = static_cast<float>((static_cast<uint32_t>(w[i * BITS / 32]) >> ((i * BITS) % 32)) & ((1u << BITS) - 1u));
    }
  } else {
    // Word by word: each word's PER codes are one vector of constant shifts (vectorises; no division per code).
    constexpr int PER = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1u;
    const int whole = D / PER;
    for (int j = 0; j < whole; ++j) {
      const uint32_t x = static_cast<uint32_t>(w[j]);
      float* __restrict o = out + j * PER;
      for (int k = 0; k < PER; ++k) o[k] = static_cast<float>((x >> (BITS * k)) & MASK);
    }
    for (int i = whole * PER; i < D; ++i) {
      out[i] = static_cast<float>((static_cast<uint32_t>(w[i / PER]) >> (BITS * (i % PER))) & MASK);
    }
  }
}

inline void unpack(int bits, const int32_t* w, int D, float* out) {
  switch (bits) {
    case 2: unpack_row<2>(w, D, out); break;
    case 3: unpack_row<3>(w, D, out); break;
    case 4: unpack_row<4>(w, D, out); break;
    default: unpack_row<8>(w, D, out); break;
  }
}

inline float dot(const float* __restrict a, const float* __restrict b, int D) {
  float s = 0.f;
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// Vector code through GCC/Clang vector extensions (lowered to whatever the target has: AVX-512, AVX2, SSE, NEON).
// Used where head_dim is a compile-time multiple of 16 (DC: 64, 128, 256); other head dims take the scalar loops.
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

template <int DC>
constexpr bool kVec = DC > 0 && DC % 16 == 0;

inline v16f load16(const float* p) {
  v16f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void store16(float* p, v16f x) { std::memcpy(p, &x, sizeof(x)); }

inline float hsum(v16f v) {
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define KVPRESS_VBMI 1
// 16 bytes of 2-bit codes (byte i holds codes 4i..4i+3) -> 64 floats: each byte copied to 4 lanes (vpermb), each lane
// shifted to its code (vpmultishiftqb), masked, widened and converted 16 at a time.
inline void unpack64_crumbs(const uint8_t* src, float* out) {
  alignas(64) static const uint8_t kIndex[64] = {
      0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7,
      8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11, 12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14,
      15, 15, 15, 15};
  alignas(64) static const uint8_t kShift[64] = {  // bit offset in the qword: 8 * (j % 8) + 2 * (j % 4)
      0, 10, 20, 30, 32, 42, 52, 62, 0, 10, 20, 30, 32, 42, 52, 62, 0, 10, 20, 30, 32, 42, 52, 62,
      0, 10, 20, 30, 32, 42, 52, 62, 0, 10, 20, 30, 32, 42, 52, 62, 0, 10, 20, 30, 32, 42, 52, 62,
      0, 10, 20, 30, 32, 42, 52, 62, 0, 10, 20, 30, 32, 42, 52, 62};
  const __m512i bytes = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i copies = _mm512_permutexvar_epi8(_mm512_load_si512(kIndex), bytes);
  const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(kShift), copies),
                                         _mm512_set1_epi8(3));
  _mm512_storeu_ps(out, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(codes))));
  _mm512_storeu_ps(out + 16, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 1))));
  _mm512_storeu_ps(out + 32, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 2))));
  _mm512_storeu_ps(out + 48, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 3))));
}
#endif

// One token row of codes -> D floats; DC: the head dim when known at compile time.
template <int DC>
inline void unpack_codes(int bits, const int32_t* w, int D, float* __restrict out) {
  if constexpr (kVec<DC>) {
    // Plain loops over a compile-time length: GCC vectorises them (widening byte loads, converts, interleaving
    // stores); its vector-extension conversions from bytes are scalarised.
    const uint8_t* __restrict bytes = reinterpret_cast<const uint8_t*>(w);
    if (bits == 4) {
      for (int i = 0; i < DC / 2; ++i) {
        out[2 * i] = static_cast<float>(bytes[i] & 15);
        out[2 * i + 1] = static_cast<float>(bytes[i] >> 4);
      }
      return;
    }
#ifdef KVPRESS_VBMI
    if (bits == 2) {
      for (int i = 0; i < DC / 64; ++i) unpack64_crumbs(bytes + 16 * i, out + 64 * i);
      return;
    }
#endif
  }
  // 2-bit codes without AVX-512 VBMI keep the byte table (measured faster than vectorised loops); 3- and 8-bit
  // their shift loops
  unpack(bits, w, D, out);
}

// out[m * stride] = bias[m] + q[m] . k for the M rows of q [M, D] (bias may be null).
template <int DC>
inline void dot_rows(const float* __restrict q, const float* __restrict k, const float* bias, int M, int D,
                     float* __restrict out, int stride) {
  if constexpr (kVec<DC>) {
    v16f kv[DC / 16];
    for (int c = 0; c < DC / 16; ++c) kv[c] = load16(k + 16 * c);
    for (int m = 0; m < M; ++m) {
      const float* qm = q + static_cast<int64_t>(m) * DC;
      v16f s = load16(qm) * kv[0];
      for (int c = 1; c < DC / 16; ++c) s += load16(qm + 16 * c) * kv[c];
      out[m * stride] = (bias ? bias[m] : 0.f) + hsum(s);
    }
  } else {
    for (int m = 0; m < M; ++m) out[m * stride] = (bias ? bias[m] : 0.f) + dot(q + static_cast<int64_t>(m) * D, k, D);
  }
}

// exp(x) for x <= 0 (or -inf: exactly 0), branch-free so that a loop of it vectorises: 2^(x log2 e) as a power of
// two times a degree-6 polynomial of the fraction (relative error < 2e-7, below float32 rounding of the sums).
inline float exp_nonpositive(float x) {
  // Clamp the base-2 exponent (not x) at -126, the smallest normal float: below that exp(x) < 1.2e-38, which no
  // softmax sum (>= 1, its maximum's term) can see, and a smaller exponent would not fit the float's 8 bits.
  const float t = std::max(x * 1.44269504088896341f, -126.f);
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x == NEG_INF ? 0.f : p * scale;
}

// Fold one block of logits lg [M, TB] (first nt columns) and values vb [nt, D] into the running state.
template <int DC>
inline void fold_block(Partial p, int M, int D_, int nt, const float* lg, const float* vb) {
  const int D = DC > 0 ? DC : D_;
  float w[TB];
  for (int m = 0; m < M; ++m) {
    const float* row = lg + m * TB;
    float bmax = NEG_INF;
    for (int t = 0; t < nt; ++t) bmax = std::max(bmax, row[t]);
    if (bmax == NEG_INF) continue;
    const float old = p.mx[m];
    const float nm = std::max(old, bmax);
    float* __restrict a = p.acc + static_cast<int64_t>(m) * D;
    if (old != nm) {
      const float alpha = std::exp(old - nm);  // 0 when old is -inf
      p.sm[m] *= alpha;
      for (int d = 0; d < D; ++d) a[d] *= alpha;
    }
    float sum = 0.f;
    for (int t = 0; t < nt; ++t) {
      w[t] = exp_nonpositive(row[t] - nm);
      sum += w[t];
    }
    if constexpr (kVec<DC>) {
      // the row's output in registers across the block's tokens: DC / 16 independent accumulators
      v16f acc[DC / 16];
      for (int c = 0; c < DC / 16; ++c) acc[c] = load16(a + 16 * c);
      for (int t = 0; t < nt; ++t) {
        const float wt = w[t];
        const float* v = vb + static_cast<int64_t>(t) * DC;
        for (int c = 0; c < DC / 16; ++c) acc[c] += wt * load16(v + 16 * c);
      }
      for (int c = 0; c < DC / 16; ++c) store16(a + 16 * c, acc[c]);
    } else {
      for (int t = 0; t < nt; ++t) {
        const float wt = w[t];
        const float* __restrict v = vb + static_cast<int64_t>(t) * D;
        for (int d = 0; d < D; ++d) a[d] += wt * v[d];
      }
    }
    p.sm[m] += sum;
    p.mx[m] = nm;
  }
}

// Attention of rows q [M, D] over full-precision tokens k, v (row stride D, n tokens, element type T).
template <typename T, int DC>
void attend_exact(const float* q, int M, int D_, const T* k, const T* v, int64_t n, const Mask& mask, Partial p) {
  const int D = DC > 0 ? DC : D_;
  float lg[64 * TB];
  std::vector<float> kb(static_cast<size_t>(D)), vb(static_cast<size_t>(TB) * D);
  for (int64_t t0 = 0; t0 < n; t0 += TB) {
    const int nt = static_cast<int>(std::min<int64_t>(TB, n - t0));
    for (int t = 0; t < nt; ++t) {
      const T* kr = k + (t0 + t) * D;
      const float* kf;
      if constexpr (std::is_same_v<T, float>) {
        kf = kr;  // float32 keys are read in place
      } else {
        for (int d = 0; d < D; ++d) kb[d] = static_cast<float>(kr[d]);
        kf = kb.data();
      }
      dot_rows<DC>(q, kf, nullptr, M, D, lg + t, TB);
      if (mask.ptr) {
        for (int m = 0; m < M; ++m) {
          if (!mask.allowed(m, t0 + t)) lg[m * TB + t] = NEG_INF;
        }
      }
    }
    const float* vf;
    if constexpr (std::is_same_v<T, float>) {
      vf = v + t0 * D;  // float32 values too
    } else {
      for (int64_t i = 0; i < static_cast<int64_t>(nt) * D; ++i) vb[i] = static_cast<float>(v[t0 * D + i]);
      vf = vb.data();
    }
    fold_block<DC>(p, M, D, nt, lg, vf);
  }
}

// The packed body of one (batch, kv_head): pointers at its first token.
template <typename S>
struct Body {
  const int32_t* k_codes;  // [N, wk]
  const S* k_scale;        // [ng, D]
  const S* k_zero;
  const int32_t* v_codes;  // [N, wv]
  const S* v_scale;        // [N, D / vg]
  const S* v_zero;
  const int32_t* group_ids;  // [N] or null
  int64_t wk, wv;
  int key_bits, value_bits, group_size, value_group;
  // GEAR outliers: n_out exact entries per token row, written back over the dequantized value at their channel.
  const S* k_out_val = nullptr;  // [N, n_out]
  const int32_t* k_out_idx = nullptr;
  const S* v_out_val = nullptr;
  const int32_t* v_out_idx = nullptr;
  int n_out = 0;
};

// Attention of rows q [M, D] (in the body's key basis) over body tokens [t_begin, t_end).
template <typename S, int DC>
void attend_body(const float* q, int M, int D_, const Body<S>& b, int64_t t_begin, int64_t t_end, const Mask& mask,
                 Partial p) {
  const int D = DC > 0 ? DC : D_;
  float lg[64 * TB];
  const int ngv = D / b.value_group;
  std::vector<float> qs(static_cast<size_t>(M) * D), qz(M), kc(D), vb(static_cast<size_t>(TB) * D);
  int64_t group = -1, group_end = -1;
  const S* sc = nullptr;  // the current key group's per-channel scale and zero
  const S* ze = nullptr;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += TB) {
    const int nt = static_cast<int>(std::min<int64_t>(TB, t_end - t0));
    for (int t = 0; t < nt; ++t) {
      const int64_t tok = t0 + t;
      // the token's key group: read from group_ids (evicted bodies), else counted (no division per token)
      if (b.group_ids ? b.group_ids[tok] != group : tok >= group_end) {
        const int64_t g = b.group_ids ? b.group_ids[tok] : tok / b.group_size;
        group_end = (g + 1) * b.group_size;
        group = g;  // fold this key group's per-channel scale into the query, its zero into a bias
        sc = b.k_scale + g * D;
        ze = b.k_zero + g * D;
        for (int m = 0; m < M; ++m) {
          const float* qm = q + static_cast<int64_t>(m) * D;
          float* qsm = qs.data() + static_cast<int64_t>(m) * D;
          float z = 0.f;
          for (int d = 0; d < D; ++d) {
            qsm[d] = qm[d] * static_cast<float>(sc[d]);
            z += qm[d] * static_cast<float>(ze[d]);
          }
          qz[m] = z;
        }
      }
      unpack_codes<DC>(b.key_bits, b.k_codes + tok * b.wk, D, kc.data());
      dot_rows<DC>(qs.data(), kc.data(), qz.data(), M, D, lg + t, TB);
      if (mask.ptr) {
        for (int m = 0; m < M; ++m) {
          if (!mask.allowed(m, tok)) lg[m * TB + t] = NEG_INF;
        }
      }
      if (b.n_out > 0) {  // key outliers: q[c] * (exact - dequantized) added to each allowed logit
        for (int j = 0; j < b.n_out; ++j) {
          const int c = b.k_out_idx[tok * b.n_out + j];
          const float delta = static_cast<float>(b.k_out_val[tok * b.n_out + j]) -
                              (static_cast<float>(ze[c]) + kc[c] * static_cast<float>(sc[c]));
          for (int m = 0; m < M; ++m) {
            if (lg[m * TB + t] != NEG_INF) lg[m * TB + t] += q[static_cast<int64_t>(m) * D + c] * delta;
          }
        }
      }
      float* vo = vb.data() + static_cast<int64_t>(t) * D;
      unpack_codes<DC>(b.value_bits, b.v_codes + tok * b.wv, D, vo);
      const S* vs = b.v_scale + tok * ngv;
      const S* vz = b.v_zero + tok * ngv;
      if (kVec<DC> && b.value_group % 16 == 0) {
        for (int c = 0; c < D; c += 16) {
          const int gi = c / b.value_group;
          store16(vo + c, static_cast<float>(vz[gi]) + load16(vo + c) * static_cast<float>(vs[gi]));
        }
      } else {
        for (int gi = 0; gi < ngv; ++gi) {
          const float s = static_cast<float>(vs[gi]), z = static_cast<float>(vz[gi]);
          float* x = vo + static_cast<int64_t>(gi) * b.value_group;
          for (int d = 0; d < b.value_group; ++d) x[d] = z + x[d] * s;
        }
      }
      for (int j = 0; j < b.n_out; ++j) {  // value outliers: the exact value written back
        vo[b.v_out_idx[tok * b.n_out + j]] = static_cast<float>(b.v_out_val[tok * b.n_out + j]);
      }
    }
    fold_block<DC>(p, M, D, nt, lg, vb.data());
  }
}

// out [M, D] = x [M, D] @ r (transpose_r: @ r^T), r [D, D] row-major.
void matmul_rows(const float* x, const float* r, int M, int D, bool transpose_r, float* out) {
  for (int m = 0; m < M; ++m) {
    float* o = out + static_cast<int64_t>(m) * D;
    std::fill(o, o + D, 0.f);
    const float* xm = x + static_cast<int64_t>(m) * D;
    if (transpose_r) {
      for (int d = 0; d < D; ++d) o[d] = dot(xm, r + static_cast<int64_t>(d) * D, D);
    } else {
      for (int e = 0; e < D; ++e) {
        const float xe = xm[e];
        const float* re = r + static_cast<int64_t>(e) * D;
        for (int d = 0; d < D; ++d) o[d] += xe * re[d];
      }
    }
  }
}

// Merge P partial states (mx, sm [P, M], acc [P, M, D]) into out [M, D], lse [M].
void merge_partials(int P, int M, int D, const float* mx, const float* sm, const float* acc, float* out, float* lse) {
  for (int m = 0; m < M; ++m) {
    float top = NEG_INF;
    for (int i = 0; i < P; ++i) top = std::max(top, mx[i * M + m]);
    float* o = out + static_cast<int64_t>(m) * D;
    std::fill(o, o + D, 0.f);
    if (top == NEG_INF) {
      lse[m] = NEG_INF;
      continue;
    }
    float total = 0.f;
    for (int i = 0; i < P; ++i) {
      if (mx[i * M + m] == NEG_INF) continue;
      const float w = std::exp(mx[i * M + m] - top);
      total += sm[i * M + m] * w;
      const float* a = acc + (static_cast<int64_t>(i) * M + m) * D;
      for (int d = 0; d < D; ++d) o[d] += w * a[d];
    }
    const float inv = total > 0.f ? 1.f / total : 1.f;
    for (int d = 0; d < D; ++d) o[d] *= inv;
    lse[m] = top + std::log(total);
  }
}

// Merge every (batch, kv_head)'s P partial states (mx, sm [BH, P, M], acc [BH, P, M, D]) into out [BH, M, D], lse.
void merge_all(int64_t BH, int64_t P, int64_t M, int64_t D, const at::Tensor& mx, const at::Tensor& sm,
               const at::Tensor& acc, at::Tensor& out, at::Tensor& lse) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      merge_partials(P, M, D, mx.data_ptr<float>() + bh * P * M, sm.data_ptr<float>() + bh * P * M,
                     acc.data_ptr<float>() + bh * P * M * D, out.data_ptr<float>() + bh * M * D,
                     lse.data_ptr<float>() + bh * M);
    }
  });
}

// Token splits per head so that every thread gets work: at least 256 tokens a split.
int64_t split_len(int64_t n, int64_t heads) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_head = std::max<int64_t>(1, (4 * threads + heads - 1) / heads);
  const int64_t len = (n + per_head - 1) / per_head;
  return std::max<int64_t>(256, (len + 63) / 64 * 64);
}

Mask mask_of(const c10::optional<at::Tensor>& mask, int64_t head, int64_t L, int64_t n, int64_t offset) {
  Mask out;
  if (mask.has_value() && mask->defined()) {
    out.ptr = mask->data_ptr<bool>() + head * L * n + offset;
    out.stride_l = n;
    out.stride_t = 1;
    out.L = L;
  }
  return out;
}

// Calls f(std::integral_constant<int, DC>) with DC = head_dim where the vector code is instantiated, else 0.
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "kvpress cpu decode: ", what); }

}  // namespace

std::vector<at::Tensor> quant_decode(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                                     const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                                     const at::Tensor& v_zero, const c10::optional<at::Tensor>& group_ids,
                                     const c10::optional<at::Tensor>& body_mask,
                                     const c10::optional<at::Tensor>& key_rotation,
                                     const c10::optional<at::Tensor>& value_rotation, const at::Tensor& ex_k,
                                     const at::Tensor& ex_v, const c10::optional<at::Tensor>& ex_mask,
                                     int64_t key_bits, int64_t value_bits, int64_t group_size, int64_t value_group,
                                     int64_t n_body, int64_t q_len, const c10::optional<at::Tensor>& k_out_val,
                                     const c10::optional<at::Tensor>& k_out_idx,
                                     const c10::optional<at::Tensor>& v_out_val,
                                     const c10::optional<at::Tensor>& v_out_idx) {
  check(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous float32 [B,H,M,D]");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3);
  check(M <= 64 && D <= 256, "at most 64 rows per KV head and head_dim <= 256");
  check(ex_k.scalar_type() == at::kFloat && ex_k.is_contiguous() && ex_v.is_contiguous(), "exact K/V float32");
  const int64_t E = ex_k.size(2);
  const int64_t N = k_codes.size(2), NG = k_scale.size(2);
  const int64_t splits = n_body > 0 ? (n_body + split_len(n_body, B * H) - 1) / split_len(n_body, B * H) : 0;
  const int64_t slen = n_body > 0 ? split_len(n_body, B * H) : 1;
  const int64_t P = splits + 1;  // body splits + the exact segment
  auto opts = q.options();
  at::Tensor mx = at::full({B * H, P, M}, NEG_INF, opts), sm = at::zeros({B * H, P, M}, opts);
  at::Tensor acc = at::zeros({B * H, P, M, D}, opts);
  at::Tensor out = at::empty({B, H, M, D}, opts), lse = at::empty({B, H, M}, opts);
  const float* kr = key_rotation.has_value() && key_rotation->defined() ? key_rotation->data_ptr<float>() : nullptr;
  const float* vr =
      value_rotation.has_value() && value_rotation->defined() ? value_rotation->data_ptr<float>() : nullptr;
  const int32_t* gid = group_ids.has_value() && group_ids->defined() ? group_ids->data_ptr<int32_t>() : nullptr;
  const bool has_out = k_out_val.has_value() && k_out_val->defined() && k_out_val->numel() > 0;
  const int64_t n_out = has_out ? k_out_val->size(3) : 0;
  if (has_out) {
    check(k_out_val->scalar_type() == k_scale.scalar_type() && v_out_val->scalar_type() == k_scale.scalar_type() &&
              k_out_idx->scalar_type() == at::kInt && v_out_idx->scalar_type() == at::kInt &&
              k_out_val->is_contiguous() && v_out_val->is_contiguous() && k_out_idx->is_contiguous() &&
              v_out_idx->is_contiguous() && v_out_val->size(3) == n_out,
          "outliers: values in the scales' dtype, int32 channel indices, contiguous [B,H,N,n_out]");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_scale.scalar_type(), "kvpress_quant_decode", [&] {
    using S = scalar_t;
    with_head_dim(D, [&](auto dc) {
    constexpr int DC = decltype(dc)::value;
    at::parallel_for(0, B * H * P, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qrot(static_cast<size_t>(M) * D), tmp(static_cast<size_t>(M) * D);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / P, part = item % P;
        const float* qh = q.data_ptr<float>() + bh * M * D;
        Partial p{mx.data_ptr<float>() + (bh * P + part) * M, sm.data_ptr<float>() + (bh * P + part) * M,
                  acc.data_ptr<float>() + (bh * P + part) * M * D};
        if (part == splits) {  // the exact segment, unrotated
          attend_exact<float, DC>(qh, M, D, ex_k.data_ptr<float>() + bh * E * D, ex_v.data_ptr<float>() + bh * E * D,
                              E, mask_of(ex_mask, bh, q_len, E, 0), p);
          continue;
        }
        const float* qb = qh;
        if (kr) {
          matmul_rows(qh, kr, M, D, false, qrot.data());
          qb = qrot.data();
        }
        Body<S> body{k_codes.data_ptr<int32_t>() + bh * N * k_codes.size(3),
                     k_scale.data_ptr<S>() + bh * NG * D,
                     k_zero.data_ptr<S>() + bh * NG * D,
                     v_codes.data_ptr<int32_t>() + bh * N * v_codes.size(3),
                     v_scale.data_ptr<S>() + bh * N * v_scale.size(3),
                     v_zero.data_ptr<S>() + bh * N * v_zero.size(3),
                     gid ? gid + bh * N : nullptr,
                     k_codes.size(3), v_codes.size(3),
                     static_cast<int>(key_bits), static_cast<int>(value_bits), static_cast<int>(group_size),
                     static_cast<int>(value_group)};
        if (has_out) {
          body.k_out_val = k_out_val->data_ptr<S>() + bh * N * n_out;
          body.k_out_idx = k_out_idx->data_ptr<int32_t>() + bh * N * n_out;
          body.v_out_val = v_out_val->data_ptr<S>() + bh * N * n_out;
          body.v_out_idx = v_out_idx->data_ptr<int32_t>() + bh * N * n_out;
          body.n_out = static_cast<int>(n_out);
        }
        const int64_t t0 = part * slen, t1 = std::min(n_body, t0 + slen);
        attend_body<S, DC>(qb, M, D, body, t0, t1, mask_of(body_mask, bh, q_len, n_body, 0), p);
        if (vr) {  // the body's output back from the rotated value basis (linear: before normalising)
          matmul_rows(p.acc, vr, M, D, true, tmp.data());
          std::copy(tmp.begin(), tmp.end(), p.acc);
        }
      }
    });
    });
  });
  merge_all(B * H, P, M, D, mx, sm, acc, out, lse);
  return {out, lse};
}

std::vector<at::Tensor> ragged_decode(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                      const at::Tensor& offsets, const c10::optional<at::Tensor>& mask,
                                      const c10::optional<at::Tensor>& tail_k, const c10::optional<at::Tensor>& tail_v,
                                      const c10::optional<at::Tensor>& tail_mask, int64_t q_len) {
  check(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous float32 [B,H,M,D]");
  check(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == values.scalar_type(),
        "keys/values contiguous, one dtype");
  check(offsets.scalar_type() == at::kLong, "offsets int64");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3);
  check(M <= 64 && D <= 256, "at most 64 rows per KV head and head_dim <= 256");
  const bool has_tail = tail_k.has_value() && tail_k->defined() && tail_k->size(2) > 0;
  const int64_t NT = has_tail ? tail_k->size(2) : 0;
  const int64_t* off = offsets.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t s = 0; s < B * H; ++s) longest = std::max(longest, off[s + 1] - off[s]);
  const int64_t slen = split_len(std::max<int64_t>(longest, 1), B * H);
  const int64_t splits = std::max<int64_t>(1, (longest + slen - 1) / slen);
  const int64_t P = splits + (has_tail ? 1 : 0);
  auto opts = q.options();
  at::Tensor mx = at::full({B * H, P, M}, NEG_INF, opts), sm = at::zeros({B * H, P, M}, opts);
  at::Tensor acc = at::zeros({B * H, P, M, D}, opts);
  at::Tensor out = at::empty({B, H, M, D}, opts), lse = at::empty({B, H, M}, opts);
  const bool* mptr = mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;
  const int64_t mask_cols = mptr ? mask->size(1) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "kvpress_ragged_decode", [&] {
    using T = scalar_t;
    with_head_dim(D, [&](auto dc) {
    constexpr int DC = decltype(dc)::value;
    at::parallel_for(0, B * H * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / P, part = item % P;
        const float* qh = q.data_ptr<float>() + bh * M * D;
        Partial p{mx.data_ptr<float>() + (bh * P + part) * M, sm.data_ptr<float>() + (bh * P + part) * M,
                  acc.data_ptr<float>() + (bh * P + part) * M * D};
        if (part == splits) {  // the dense tail
          const T* tk = tail_k->data_ptr<T>() + bh * NT * D;
          const T* tv = tail_v->data_ptr<T>() + bh * NT * D;
          attend_exact<T, DC>(qh, M, D, tk, tv, NT, mask_of(tail_mask, bh, q_len, NT, 0), p);
          continue;
        }
        const int64_t seg0 = off[bh], seg_len = off[bh + 1] - off[bh];
        const int64_t t0 = part * slen, t1 = std::min(seg_len, t0 + slen);
        if (t0 >= t1) continue;
        Mask m;
        if (mptr) {
          m.ptr = mptr + (seg0 + t0) * mask_cols;
          m.stride_l = 1;
          m.stride_t = mask_cols;
          m.L = mask_cols;
        }
        attend_exact<T, DC>(qh, M, D, keys.data_ptr<T>() + (seg0 + t0) * D, values.data_ptr<T>() + (seg0 + t0) * D,
                        t1 - t0, m, p);
      }
    });
    });
  });
  merge_all(B * H, P, M, D, mx, sm, acc, out, lse);
  return {out, lse};
}

// quantize.cpp
std::vector<torch::Tensor> quantize_pack(torch::Tensor x, int64_t bits, int64_t group, bool channel,
                                         int64_t scale_code);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_decode", &quant_decode, "kvpress fused quantized decode attention (CPU)");
  m.def("ragged_decode", &ragged_decode, "kvpress fused ragged decode attention (CPU)");
  m.def("quantize_pack", &quantize_pack, "kvpress fused quantize-and-pack (CPU)");
}
