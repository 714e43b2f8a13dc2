// graphprune::packed_linear -- a sparse Linear for few tokens (decode) on the CPU.
//
// Storage of a weight W [out, in] ("bitmask + packed values"):
//   mask    int32 [out, words], words = ceil(in / 32); bit b of word w of row r is set
//           when W[r, 32 * w + b] != 0 (bits past `in` are zero);
//   offsets int64 [out + 1]; row r's nonzeros are values[offsets[r] : offsets[r + 1]];
//   values  float32 [nnz], each row's nonzeros in increasing column order.
// The mask costs 1 bit per weight (1/32 of the dense bytes) instead of CSR's 32- or 64-bit
// column index per nonzero, so at 50 % sparsity the kernel reads ~53 % of the dense bytes
// where CSR reads 100-150 %.
//
// Computation: y[t, r] = bias[r] + sum_j W[r, j] * x[t, j] for every token t.
// With AVX-512 each 32-bit mask word is split into two 16-bit chunks; a chunk expands
// the next popcount(chunk) packed values into the lanes of its set bits
// (_mm512_maskz_expandloadu_ps, zeros elsewhere) and one FMA per token multiplies them
// with the 16 consecutive inputs of that token. The weights are read once per call for up
// to 8 tokens (the accumulators of 8 tokens x 2 chunks stay in registers); larger token
// counts are processed in blocks of 8, which re-reads the weights per block (correct,
// but a dense GEMM is the better kernel there). With AVX2 only (no expand loads), each
// 8-bit chunk of a word loads the next 8 packed values and spreads the first
// popcount(chunk) of them into the lanes of the set bits with one permute
// (_mm256_permutevar8x32_ps) whose lane indices, and the lanes to keep, come from two
// 256-entry tables indexed by the chunk; near the end of the values the load is masked so
// it never reads past them. Without either, a scalar loop walks the set bits. Rows are
// split between threads with at::parallel_for.
//
// Unlike a dense row, the address of each value load depends on the popcounts of the mask
// read just before, so out-of-order execution cannot run far ahead of a cache miss and one
// thread reached only ~1/4 of the memory bandwidth; software prefetches a few KiB ahead in
// the values (and a few rows ahead in the mask) bring it close to the bandwidth limit.
// Prefetches are hints and never fault, so running past the end of the arrays is harmless.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxTokens = 8;  // tokens per pass over the weights
constexpr int64_t kGrainRows = 32;  // rows per parallel task at least
constexpr int64_t kPrefetchFloats = 1024;  // values prefetched this far ahead (4 KiB)
constexpr int64_t kPrefetchMaskRows = 4;  // mask rows prefetched this far ahead

struct Packed {
  const uint32_t* mask;
  const int64_t* offsets;
  const float* values;
  const float* bias;  // nullptr when there is none
  int64_t in;
  int64_t out;
  int64_t words;
};

#if defined(__AVX2__) && defined(__FMA__)
// 8-lane helpers of the AVX2 paths (the packed kernel without AVX-512, and the dense kernel)
inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// lanes [0, n) all ones, the rest zero (n in 0..8)
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

#ifdef __AVX512F__

// The next popcount(k) packed values spread into the lanes of the set bits of k (zeros
// elsewhere); reads exactly popcount(k) floats, so no padding is needed after the values.
inline __m512 expand(__mmask16 k, const float* v) { return _mm512_maskz_expandloadu_ps(k, v); }

// Rows [r0, r1) for T tokens starting at x (row stride `in`), writing y (row stride `out`).
template <int T>
void rows_avx512(const Packed& p, const float* x, float* y, int64_t r0, int64_t r1) {
  const int64_t full_words = p.in / 32;  // words whose 32 columns all lie inside `in`
  for (int64_t r = r0; r < r1; ++r) {
    const float b = p.bias ? p.bias[r] : 0.0f;
    const int64_t begin = p.offsets[r];
    if (p.offsets[r + 1] == begin) {  // empty row: only the bias
      for (int t = 0; t < T; ++t) y[t * p.out + r] = b;
      continue;
    }
    const uint32_t* m = p.mask + r * p.words;
    const float* v = p.values + begin;
    if (r + kPrefetchMaskRows < p.out) {
      _mm_prefetch(reinterpret_cast<const char*>(m + kPrefetchMaskRows * p.words), _MM_HINT_T0);
    }
    // two accumulator sets (low / high chunk) keep two independent FMA chains per token
    __m512 lo[T], hi[T];
    for (int t = 0; t < T; ++t) {
      lo[t] = _mm512_setzero_ps();
      hi[t] = _mm512_setzero_ps();
    }
    for (int64_t w = 0; w < full_words; ++w) {
      const uint32_t bits = m[w];
      // value addresses depend on the mask: prefetch the stream (see the top of the file)
      _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchFloats), _MM_HINT_T0);
      const __mmask16 k0 = static_cast<__mmask16>(bits & 0xFFFFu);
      const __mmask16 k1 = static_cast<__mmask16>(bits >> 16);
      const __m512 w0 = expand(k0, v);
      v += __builtin_popcount(k0);
      const __m512 w1 = expand(k1, v);
      v += __builtin_popcount(k1);
      const float* xc = x + w * 32;
      for (int t = 0; t < T; ++t) {
        lo[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xc + t * p.in), lo[t]);
        hi[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xc + t * p.in + 16), hi[t]);
      }
    }
    if (full_words < p.words) {
      // last, partial word: load only the columns that exist (masked loads never touch
      // memory past the end of x); the mask has no bits past `in`
      const int64_t base = full_words * 32;
      const int64_t rest = p.in - base;  // 1..31
      const uint32_t bits = m[full_words];
      const __mmask16 in0 = static_cast<__mmask16>(rest >= 16 ? 0xFFFFu : ((1u << rest) - 1u));
      const __mmask16 in1 = static_cast<__mmask16>(rest > 16 ? ((1u << (rest - 16)) - 1u) : 0u);
      const __mmask16 k0 = static_cast<__mmask16>(bits & 0xFFFFu);
      const __mmask16 k1 = static_cast<__mmask16>(bits >> 16);
      const __m512 w0 = expand(k0, v);
      v += __builtin_popcount(k0);
      const __m512 w1 = expand(k1, v);
      const float* xc = x + base;
      for (int t = 0; t < T; ++t) {
        lo[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(in0, xc + t * p.in), lo[t]);
        hi[t] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(in1, xc + t * p.in + 16), hi[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      y[t * p.out + r] = b + _mm512_reduce_add_ps(_mm512_add_ps(lo[t], hi[t]));
    }
  }
}

#endif  // __AVX512F__

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define GRAPHPRUNE_AVX2 1

// For each 8-bit chunk k: idx[k][j] = rank of bit j among the set bits of k (which packed
// value lane j takes), keep[k][j] = all ones when bit j is set, else zero.
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t keep[256][8];
};

const ExpandTable& expand_table() {
  static const ExpandTable table = [] {
    ExpandTable t{};
    for (int k = 0; k < 256; ++k) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool set = (k >> j) & 1;
        t.idx[k][j] = set ? rank++ : 0;
        t.keep[k][j] = set ? -1 : 0;
      }
    }
    return t;
  }();
  return table;
}

// The next popcount(k) values of v spread into the lanes of the set bits of k, zeros
// elsewhere. Near the end of the values (Tail) the load is masked so that it never reads
// at or past `end`; elsewhere it is a plain load of 8 floats (a branch per chunk would cost
// more than the load, since the compiler may evaluate both sides).
template <bool Tail>
inline __m256 expand8(const ExpandTable& t, uint32_t k, const float* v, const float* end) {
  __m256 raw;
  if constexpr (Tail) {
    raw = _mm256_maskload_ps(v, first_lanes(std::min<int64_t>(8, end - v)));
  } else {
    raw = _mm256_loadu_ps(v);
  }
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.idx[k]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.keep[k])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(raw, idx), keep);
}

// One row; Tail when its 8-float loads could reach past the end of the values.
template <int T, bool Tail>
inline void row_avx2(const Packed& p, const ExpandTable& table, const float* end, const float* x, float* y, int64_t r) {
  const int64_t full_words = p.in / 32;
  {
    const float b = p.bias ? p.bias[r] : 0.0f;
    const int64_t begin = p.offsets[r];
    if (p.offsets[r + 1] == begin) {
      for (int t = 0; t < T; ++t) y[t * p.out + r] = b;
      return;
    }
    const uint32_t* m = p.mask + r * p.words;
    const float* v = p.values + begin;
    if (r + kPrefetchMaskRows < p.out) {
      _mm_prefetch(reinterpret_cast<const char*>(m + kPrefetchMaskRows * p.words), _MM_HINT_T0);
    }
    // two accumulator sets (even / odd chunks): two independent FMA chains per token, in registers
    __m256 even[T], odd[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      even[t] = _mm256_setzero_ps();
      odd[t] = _mm256_setzero_ps();
    }
    for (int64_t w = 0; w < full_words; ++w) {
      const uint32_t bits = m[w];
      _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchFloats), _MM_HINT_T0);
      // each chunk's start from independent popcounts: the only serial dependency between
      // words is v += popcount(bits)
      const __m256 w0 = expand8<Tail>(table, bits & 0xFFu, v, end);
      const __m256 w1 = expand8<Tail>(table, (bits >> 8) & 0xFFu, v + __builtin_popcount(bits & 0xFFu), end);
      const __m256 w2 = expand8<Tail>(table, (bits >> 16) & 0xFFu, v + __builtin_popcount(bits & 0xFFFFu), end);
      const __m256 w3 = expand8<Tail>(table, bits >> 24, v + __builtin_popcount(bits & 0xFFFFFFu), end);
      v += __builtin_popcount(bits);
      const float* xc = x + w * 32;
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const float* xt = xc + t * p.in;
        even[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), even[t]);
        odd[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), odd[t]);
        even[t] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xt + 16), even[t]);
        odd[t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xt + 24), odd[t]);
      }
    }
    if (full_words < p.words) {  // last, partial word: masked input loads, no bits past `in`
      const int64_t base = full_words * 32;
      const uint32_t bits = m[full_words];
      for (int c = 0; c < 4 && base + 8 * c < p.in; ++c) {
        const uint32_t k = (bits >> (8 * c)) & 0xFFu;
        const __m256 wv = expand8<Tail>(table, k, v, end);
        v += __builtin_popcount(k);
        const __m256i lanes = first_lanes(std::min<int64_t>(8, p.in - base - 8 * c));
        for (int t = 0; t < T; ++t) {
          even[t] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + t * p.in + base + 8 * c, lanes), even[t]);
        }
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) y[t * p.out + r] = b + hsum(_mm256_add_ps(even[t], odd[t]));
  }
}

template <int T>
void rows_avx2(const Packed& p, const float* x, float* y, int64_t r0, int64_t r1) {
  const ExpandTable& table = expand_table();
  const int64_t total = p.offsets[p.out];
  const float* end = p.values + total;
  for (int64_t r = r0; r < r1; ++r) {
    if (p.offsets[r + 1] + 8 <= total) {
      row_avx2<T, false>(p, table, end, x, y, r);
    } else {
      row_avx2<T, true>(p, table, end, x, y, r);
    }
  }
}

#endif  // AVX2

// Portable path: walk the set bits of each word. Any T up to kMaxTokens.
void rows_scalar(const Packed& p, const float* x, float* y, int64_t r0, int64_t r1, int64_t T) {
  float acc[kMaxTokens];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < T; ++t) acc[t] = 0.0f;
    const uint32_t* m = p.mask + r * p.words;
    const float* v = p.values + p.offsets[r];
    for (int64_t w = 0; w < p.words; ++w) {
      uint32_t bits = m[w];
      const float* xc = x + w * 32;
      while (bits) {
        const int j = __builtin_ctz(bits);
        const float value = *v++;
        for (int64_t t = 0; t < T; ++t) acc[t] += value * xc[t * p.in + j];
        bits &= bits - 1;
      }
    }
    const float b = p.bias ? p.bias[r] : 0.0f;
    for (int64_t t = 0; t < T; ++t) y[t * p.out + r] = b + acc[t];
  }
}

void rows(const Packed& p, const float* x, float* y, int64_t r0, int64_t r1, int64_t T) {
#ifdef __AVX512F__
  switch (T) {
    case 1: return rows_avx512<1>(p, x, y, r0, r1);
    case 2: return rows_avx512<2>(p, x, y, r0, r1);
    case 3: return rows_avx512<3>(p, x, y, r0, r1);
    case 4: return rows_avx512<4>(p, x, y, r0, r1);
    case 5: return rows_avx512<5>(p, x, y, r0, r1);
    case 6: return rows_avx512<6>(p, x, y, r0, r1);
    case 7: return rows_avx512<7>(p, x, y, r0, r1);
    case 8: return rows_avx512<8>(p, x, y, r0, r1);
    default: break;
  }
#elif defined(GRAPHPRUNE_AVX2)
  switch (T) {
    case 1: return rows_avx2<1>(p, x, y, r0, r1);
    case 2: return rows_avx2<2>(p, x, y, r0, r1);
    case 3: return rows_avx2<3>(p, x, y, r0, r1);
    case 4: return rows_avx2<4>(p, x, y, r0, r1);
    case 5: return rows_avx2<5>(p, x, y, r0, r1);
    case 6: return rows_avx2<6>(p, x, y, r0, r1);
    case 7: return rows_avx2<7>(p, x, y, r0, r1);
    case 8: return rows_avx2<8>(p, x, y, r0, r1);
    default: break;
  }
#endif
  rows_scalar(p, x, y, r0, r1, T);
}

at::Tensor packed_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& mask,
    const at::Tensor& offsets,
    const at::Tensor& values,
    const std::optional<at::Tensor>& bias,
    int64_t out_features) {
  TORCH_CHECK(x.dim() >= 1, "packed_linear: x must have at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "packed_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == at::kFloat, "packed_linear: values must be float32");
  TORCH_CHECK(mask.scalar_type() == at::kInt, "packed_linear: mask must be int32 words");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "packed_linear: offsets must be int64");
  const int64_t in = x.size(-1);
  const int64_t out = out_features;
  const int64_t words = (in + 31) / 32;
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == out && mask.size(1) == words,
              "packed_linear: mask must be [", out, ", ", words, "] for ", in, " inputs, got ", mask.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == out + 1, "packed_linear: offsets must be [", out + 1, "]");
  TORCH_CHECK(values.dim() == 1, "packed_linear: values must be 1-D");
  const at::Tensor m = mask.contiguous();
  const at::Tensor o = offsets.contiguous();
  const at::Tensor v = values.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == out,
                "packed_linear: bias must be float32 [", out, "]");
  }
  TORCH_CHECK(out == 0 || o.data_ptr<int64_t>()[out] == v.numel(),
              "packed_linear: offsets[-1] must equal the number of values");

  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  const int64_t tokens = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  if (tokens == 0 || out == 0) return y;

  Packed p;
  p.mask = reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>());
  p.offsets = o.data_ptr<int64_t>();
  p.values = v.data_ptr<float>();
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.in = in;
  p.out = out;
  p.words = words;
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (in == 0) {  // no inputs: every output is its bias
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t r = 0; r < out; ++r) yp[t * out + r] = p.bias ? p.bias[r] : 0.0f;
    return y;
  }

  at::parallel_for(0, out, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t t0 = 0; t0 < tokens; t0 += kMaxTokens) {
      const int64_t T = std::min(kMaxTokens, tokens - t0);
      rows(p, xp + t0 * in, yp + t0 * out, r0, r1, T);
    }
  });
  return y;
}

// ---------------------------------------------------------------------------- dense
// graphprune::dense_linear: y = x W^T + b for a dense row-major W [out, in] and few tokens.
// torch's float32 matmul with one to eight rows of x reads W at a fraction of the memory
// bandwidth on some CPUs; this streams each row of W once per block of 8 tokens with FMAs,
// rows split between threads.
#if defined(__AVX2__) && defined(__FMA__)
template <int T>
void dense_rows_avx2(const float* W, const float* bias, int64_t in, int64_t out, const float* x, float* y, int64_t r0, int64_t r1) {
  const int64_t full = in / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const float* w = W + r * in;
    __m256 even[T], odd[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      even[t] = _mm256_setzero_ps();
      odd[t] = _mm256_setzero_ps();
    }
    for (int64_t j = 0; j < full; j += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j + kPrefetchFloats), _MM_HINT_T0);
      const __m256 w0 = _mm256_loadu_ps(w + j);
      const __m256 w1 = _mm256_loadu_ps(w + j + 8);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        even[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * in + j), even[t]);
        odd[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * in + j + 8), odd[t]);
      }
    }
    float rest[T];
    for (int t = 0; t < T; ++t) rest[t] = 0.0f;
    for (int64_t j = full; j < in; ++j)
      for (int t = 0; t < T; ++t) rest[t] += w[j] * x[t * in + j];
    const float b = bias ? bias[r] : 0.0f;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) y[t * out + r] = b + rest[t] + hsum(_mm256_add_ps(even[t], odd[t]));
  }
}
#endif

void dense_rows_scalar(const float* W, const float* bias, int64_t in, int64_t out, const float* x, float* y, int64_t r0, int64_t r1, int64_t T) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* w = W + r * in;
    for (int64_t t = 0; t < T; ++t) {
      float acc = 0.0f;
      for (int64_t j = 0; j < in; ++j) acc += w[j] * x[t * in + j];
      y[t * out + r] = (bias ? bias[r] : 0.0f) + acc;
    }
  }
}

void dense_rows(const float* W, const float* bias, int64_t in, int64_t out, const float* x, float* y, int64_t r0, int64_t r1, int64_t T) {
#if defined(__AVX2__) && defined(__FMA__)
  switch (T) {
    case 1: return dense_rows_avx2<1>(W, bias, in, out, x, y, r0, r1);
    case 2: return dense_rows_avx2<2>(W, bias, in, out, x, y, r0, r1);
    case 3: return dense_rows_avx2<3>(W, bias, in, out, x, y, r0, r1);
    case 4: return dense_rows_avx2<4>(W, bias, in, out, x, y, r0, r1);
    case 5: return dense_rows_avx2<5>(W, bias, in, out, x, y, r0, r1);
    case 6: return dense_rows_avx2<6>(W, bias, in, out, x, y, r0, r1);
    case 7: return dense_rows_avx2<7>(W, bias, in, out, x, y, r0, r1);
    case 8: return dense_rows_avx2<8>(W, bias, in, out, x, y, r0, r1);
    default: break;
  }
#endif
  dense_rows_scalar(W, bias, in, out, x, y, r0, r1, T);
}

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "dense_linear: x must have at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "dense_linear: x and weight must be float32");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1),
              "dense_linear: weight must be [out, ", x.size(-1), "], got ", weight.sizes());
  const int64_t in = x.size(-1);
  const int64_t out = weight.size(0);
  const at::Tensor w = weight.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == out, "dense_linear: bias must be float32 [", out, "]");
  }
  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  const int64_t tokens = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  if (tokens == 0 || out == 0) return y;
  const float* wp = w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t t0 = 0; t0 < tokens; t0 += kMaxTokens) {
      const int64_t T = std::min(kMaxTokens, tokens - t0);
      dense_rows(wp, bp, in, out, xp + t0 * in, yp + t0 * out, r0, r1, T);
    }
  });
  return y;
}

// Whether this build uses the AVX-512 path (for reports and tests).
bool packed_has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

// The vector path this build uses: "avx512", "avx2" or "scalar".
std::string packed_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(GRAPHPRUNE_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(graphprune, m) {
  m.set_python_module("graphprune.kernels.packed");
  m.def("packed_linear(Tensor x, Tensor mask, Tensor offsets, Tensor values, Tensor? bias, int out_features) -> Tensor");
  m.def("packed_has_avx512() -> bool", &packed_has_avx512);
  m.def("packed_isa() -> str", &packed_isa);
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(graphprune, CPU, m) {
  m.impl("packed_linear", &packed_linear_cpu);
  m.impl("dense_linear", &dense_linear_cpu);
}
