// kvpress fused CPU quantize-and-pack: min/max per group, scale and zero rounded outward to the scale dtype,
// codes rounded half-to-even and packed along head_dim, in one pass over the float32 input.
//
// Bit-exact with kvpress.quant.quantizer.quantize (no `exclude`) followed by kvpress.quant.packing.pack:
//   zero  = mn rounded down to S, scale = ((mx - zero) clamped at 0) / levels rounded up to S (float32 arithmetic)
//   code  = clamp(nearbyint((x - zero) / (scale > 0 ? scale : 1)), 0, levels)
//   words = little-endian bit stream of the codes of one token row (code 0 in the low bits of word 0).
// A NaN in a group makes its zero and scale NaN (as torch's amin/amax propagate it); the caller raises on
// non-finite scales, exactly as the torch quantizer does.
//
// Axes (kvpress.quant.quantizer): "channel" (keys) groups G consecutive tokens of one channel, scale/zero
// [R, ceil(T / G), D]; "token" (values) groups G consecutive channels of one token, scale/zero [R, T, D / G].

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// The next representable 16-bit float after `x` toward +inf (up) or -inf, as torch.nextafter does.
inline uint16_t next16(uint16_t bits, bool up) {
  if ((bits & 0x7fff) == 0) return up ? 0x0001 : 0x8001;  // +-0 -> the smallest subnormal of that direction
  const bool negative = bits & 0x8000;
  return (up != negative) ? bits + 1 : bits - 1;
}

template <typename S>
inline S round_toward(float value, bool up) {
  S r(value);  // round to nearest even
  const float back = static_cast<float>(r);
  if (up ? back < value : back > value) r.x = next16(r.x, up);
  return r;
}

template <>
inline float round_toward<float>(float value, bool) {
  return value;
}

inline void update_range(float v, float& mn, float& mx) {
  // NaN sticks, as torch's amin / amax propagate it
  if (v < mn || v != v) mn = v;
  if (v > mx || v != v) mx = v;
}

template <typename S>
inline void scale_zero(float mn, float mx, int levels, S& scale, S& zero, float& scale_f, float& zero_f) {
  zero = round_toward<S>(mn, false);
  zero_f = static_cast<float>(zero);
  float span = mx - zero_f;
  if (span < 0.0f) span = 0.0f;
  scale = round_toward<S>(span / static_cast<float>(levels), true);
  scale_f = static_cast<float>(scale);
}

inline uint8_t code_of(float x, float zero_f, float scale_f, int levels) {
  const float divisor = scale_f > 0.0f ? scale_f : 1.0f;
  float c = std::nearbyint((x - zero_f) / divisor);
  c = c > 0.0f ? c : 0.0f;  // NaN (a non-finite input, refused by the caller) -> 0
  c = c < static_cast<float>(levels) ? c : static_cast<float>(levels);
  return static_cast<uint8_t>(c);
}

// One token row of `d` codes into ceil(d * bits / 32) words.
inline void pack_row(const uint8_t* codes, int64_t d, int bits, int32_t* out) {
  uint64_t acc = 0;
  int filled = 0;
  int64_t w = 0;
  for (int64_t i = 0; i < d; ++i) {
    acc |= static_cast<uint64_t>(codes[i]) << filled;
    filled += bits;
    if (filled >= 32) {
      out[w++] = static_cast<int32_t>(static_cast<uint32_t>(acc));
      acc >>= 32;
      filled -= 32;
    }
  }
  if (filled > 0) out[w] = static_cast<int32_t>(static_cast<uint32_t>(acc));
}

template <typename S>
void channel_groups(const float* x, int64_t rows, int64_t t, int64_t d, int bits, int64_t g, int64_t words,
                    int32_t* codes, S* scale, S* zero) {
  const int levels = (1 << bits) - 1;
  const float top = static_cast<float>(levels);
  const int64_t n_groups = (t + g - 1) / g;
  at::parallel_for(0, rows * n_groups, 1, [&](int64_t begin, int64_t end) {
    // per channel: range, NaN seen, stored zero and the divisor; branch-free loops over channels vectorise
    std::vector<float> mn(d), mx(d), zf(d), div(d);
    std::vector<uint8_t> nan(d), row(d);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / n_groups, grp = job % n_groups;
      const int64_t t0 = grp * g, t1 = std::min(t, t0 + g);
      const float* base = x + r * t * d;
      for (int64_t c = 0; c < d; ++c) {
        mn[c] = std::numeric_limits<float>::infinity();
        mx[c] = -std::numeric_limits<float>::infinity();
        nan[c] = 0;
      }
      for (int64_t tok = t0; tok < t1; ++tok) {
        const float* xr = base + tok * d;
        for (int64_t c = 0; c < d; ++c) {
          const float v = xr[c];
          mn[c] = v < mn[c] ? v : mn[c];
          mx[c] = v > mx[c] ? v : mx[c];
          nan[c] |= static_cast<uint8_t>(v != v);
        }
      }
      S* sc = scale + (r * n_groups + grp) * d;
      S* ze = zero + (r * n_groups + grp) * d;
      for (int64_t c = 0; c < d; ++c) {
        if (nan[c]) mn[c] = mx[c] = std::numeric_limits<float>::quiet_NaN();  // as torch's amin / amax
        float sf;
        scale_zero<S>(mn[c], mx[c], levels, sc[c], ze[c], sf, zf[c]);
        div[c] = sf > 0.0f ? sf : 1.0f;
      }
      for (int64_t tok = t0; tok < t1; ++tok) {
        const float* xr = base + tok * d;
        for (int64_t c = 0; c < d; ++c) {
          float q = std::nearbyint((xr[c] - zf[c]) / div[c]);
          q = q > 0.0f ? q : 0.0f;  // NaN (a non-finite input, refused by the caller) -> 0
          q = q < top ? q : top;
          row[c] = static_cast<uint8_t>(q);
        }
        pack_row(row.data(), d, bits, codes + (r * t + tok) * words);
      }
    }
  });
}

template <typename S>
void token_groups(const float* x, int64_t rows, int64_t t, int64_t d, int bits, int64_t g, int64_t words,
                  int32_t* codes, S* scale, S* zero) {
  const int levels = (1 << bits) - 1;
  const int64_t per_token = d / g;
  at::parallel_for(0, rows * t, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(d);
    for (int64_t tok = begin; tok < end; ++tok) {  // tok indexes [rows * t]
      const float* xr = x + tok * d;
      for (int64_t j = 0; j < per_token; ++j) {
        float mn = std::numeric_limits<float>::infinity(), mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = j * g; c < (j + 1) * g; ++c) update_range(xr[c], mn, mx);
        float zf, sf;
        scale_zero<S>(mn, mx, levels, scale[tok * per_token + j], zero[tok * per_token + j], sf, zf);
        for (int64_t c = j * g; c < (j + 1) * g; ++c) row[c] = code_of(xr[c], zf, sf, levels);
      }
      pack_row(row.data(), d, bits, codes + tok * words);
    }
  });
}

}  // namespace

// x: [R, T, D] float32 contiguous. Returns (codes [R, T, words] int32, scale, zero) with scale/zero
// [R, ceil(T / G), D] (channel) or [R, T, D / G] (token) in the scale dtype (0 float32, 1 float16, 2 bfloat16).
std::vector<torch::Tensor> quantize_pack(torch::Tensor x, int64_t bits, int64_t group, bool channel,
                                         int64_t scale_code) {
  TORCH_CHECK(scale_code >= 0 && scale_code <= 2, "scale dtype code must be 0, 1 or 2");
  const at::ScalarType scale_dtype = scale_code == 0 ? at::kFloat : (scale_code == 1 ? at::kHalf : at::kBFloat16);
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be [R, T, D] float32");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  const int64_t rows = x.size(0), t = x.size(1), d = x.size(2);
  TORCH_CHECK(group >= 1 && (channel || d % group == 0), "group must be positive (and divide D for token groups)");
  const int64_t words = (d * bits + 31) / 32;
  auto codes = torch::zeros({rows, t, words}, x.options().dtype(at::kInt));
  const int64_t n_groups = channel ? (t + group - 1) / group : d / group;
  auto shape = channel ? std::vector<int64_t>{rows, n_groups, d} : std::vector<int64_t>{rows, t, n_groups};
  auto scale = torch::empty(shape, x.options().dtype(scale_dtype));
  auto zero = torch::empty(shape, x.options().dtype(scale_dtype));
  if (rows * t == 0) return {codes, scale, zero};
  const float* xp = x.data_ptr<float>();
  int32_t* cp = codes.data_ptr<int32_t>();
  const int b = static_cast<int>(bits);
  auto run = [&](auto* sp, auto* zp) {
    using S = std::remove_pointer_t<decltype(sp)>;
    if (channel)
      channel_groups<S>(xp, rows, t, d, b, group, words, cp, sp, zp);
    else
      token_groups<S>(xp, rows, t, d, b, group, words, cp, sp, zp);
  };
  switch (scale_dtype) {
    case at::kFloat: run(scale.data_ptr<float>(), zero.data_ptr<float>()); break;
    case at::kHalf: run(scale.data_ptr<c10::Half>(), zero.data_ptr<c10::Half>()); break;
    case at::kBFloat16: run(scale.data_ptr<c10::BFloat16>(), zero.data_ptr<c10::BFloat16>()); break;
    default: TORCH_CHECK(false, "scale_dtype must be float32, float16 or bfloat16");
  }
  return {codes, scale, zero};
}
