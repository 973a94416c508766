// fastpref._C: CPU row pass (logsumexp / target gather forward, in-place
// dlogits backward) over [n, V] fp32 or bf16 logits.
//
// It deliberately does not include or link libtorch: tensors arrive as raw
// data pointers (Python ints), shapes and row strides, so the extension
// builds against pybind11 alone and does not depend on the torch ABI.
//
// SIMD: AVX-512 and AVX2+FMA variants are compiled with target attributes and
// chosen at run time (a scalar variant covers everything else), so a
// `generic` build still vectorises. Threads: std::thread, not OpenMP (torch
// ships its own libgomp; two OpenMP runtimes in a process clash).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FP_X86 1
#include <immintrin.h>
#else
#define FP_X86 0
#endif

namespace py = pybind11;

namespace fastpref {

// ---------------------------------------------------------------- scalar helpers

static inline float bits_to_f32(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
static inline uint32_t f32_to_bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

static inline float to_f32(float v) { return v; }
static inline float to_f32(uint16_t v) { return bits_to_f32(static_cast<uint32_t>(v) << 16); }

template <typename T>
static inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) {
    return v;
}
// Round to nearest even, like torch; NaN stays NaN (forced quiet) instead of
// rounding into inf.
template <>
inline uint16_t from_f32<uint16_t>(float v) {
    uint32_t b = f32_to_bits(v);
    if (v != v) return static_cast<uint16_t>((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return static_cast<uint16_t>(b >> 16);
}

// a*b + c rounded once (the product of two floats is exact in double), without
// depending on hardware FMA for the scalar tails.
static inline float fma_scalar(float a, float b, float c) {
    return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
}

// exp(x) = 2^n * exp(r), r = x - n*ln2 in [-ln2/2, ln2/2] (Cody-Waite split of
// ln2), exp(r) by a degree-7 polynomial (Cephes expf coefficients, ~1 ulp).
// Inputs are clamped to [-104, 89]: beyond that the result is 0 / inf anyway,
// and the clamp keeps -inf/+inf from turning into inf - inf = NaN.
// The clamp order (min/max with the constant first) lets NaN through.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpLo = -104.f;
constexpr float kExpHi = 89.f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;

static inline float exp_scalar(float x) {
    if (x != x) return x;
    x = x < kExpLo ? kExpLo : x;
    x = x > kExpHi ? kExpHi : x;
    // round to nearest via the 1.5*2^23 trick (|x*log2e| < 2^22 after the clamp)
    const float n = (x * kLog2e + 12582912.f) - 12582912.f;
    float r = x - n * kLn2Hi;  // exact: kLn2Hi has 9 significant bits, |n| <= 151
    r = r - n * kLn2Lo;
    float p = kP0;
    p = p * r + kP1;
    p = p * r + kP2;
    p = p * r + kP3;
    p = p * r + kP4;
    p = p * r + kP5;
    const float y = p * (r * r) + r + 1.f;
    // 2^n as two factors so each stays a normal float for n in [-150, 128];
    // the products then overflow to inf / underflow to denormal or 0 correctly.
    const int ni = static_cast<int>(n);
    const int e1 = ni / 2, e2 = ni - e1;
    return y * bits_to_f32(static_cast<uint32_t>(e1 + 127) << 23) *
           bits_to_f32(static_cast<uint32_t>(e2 + 127) << 23);
}

// ---------------------------------------------------------------- kernel plumbing

struct RowArgs {
    void* x = nullptr;  // logits (forward: read only; backward: overwritten)
    int64_t ld = 0;     // row stride in elements
    int64_t V = 0;      // columns (vb for backward)
    const int64_t* labels = nullptr;
    float scale = 1.f;
    float* lse_out = nullptr;
    float* tgt_out = nullptr;
    const float* lse_in = nullptr;
    const float* grad = nullptr;
    int64_t v_off = 0;
    int64_t* nbad = nullptr;
};

using KernelFn = void (*)(const RowArgs&, int64_t, int64_t);
struct KernelSet {
    KernelFn fwd_f32, fwd_bf16, bwd_f32, bwd_bf16;
};

// ---------------------------------------------------------------- scalar ISA

namespace isa_scalar {
#define FP_TARGET
struct Vec {
    using F = float;
    static constexpr int64_t W = 1;
    static inline F zero() { return 0.f; }
    static inline F set1(float v) { return v; }
    static inline F load(const float* p) { return *p; }
    static inline F load(const uint16_t* p) { return to_f32(*p); }
    static inline void store(float* p, F v) { *p = v; }
    static inline void store(uint16_t* p, F v) { *p = from_f32<uint16_t>(v); }
    static inline F fma(F a, F b, F c) { return fma_scalar(a, b, c); }
    static inline F mul(F a, F b) { return a * b; }
    static inline F add(F a, F b) { return a + b; }
    static inline F sub(F a, F b) { return a - b; }
    static inline F max(F a, F b) { return a > b ? a : b; }  // NaN a -> b, like maxps
    static inline float hmax(F a) { return a; }
    static inline double hsum(F a) { return a; }
    static inline F exp(F x) { return exp_scalar(x); }
};
#include "rowpass_impl.inc"
#undef FP_TARGET
}  // namespace isa_scalar

#if FP_X86
// ---------------------------------------------------------------- AVX2 + FMA

namespace isa_avx2 {
#define FP_TARGET __attribute__((target("avx2,fma")))
struct Vec {
    using F = __m256;
    static constexpr int64_t W = 8;
    FP_TARGET static inline F zero() { return _mm256_setzero_ps(); }
    FP_TARGET static inline F set1(float v) { return _mm256_set1_ps(v); }
    FP_TARGET static inline F load(const float* p) { return _mm256_loadu_ps(p); }
    FP_TARGET static inline F load(const uint16_t* p) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    FP_TARGET static inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
    FP_TARGET static inline void store(uint16_t* p, F v) {
        const __m256i b = _mm256_castps_si256(v);
        const __m256i hi = _mm256_srli_epi32(b, 16);
        const __m256i bias = _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)),
                                              _mm256_set1_epi32(0x7fff));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, bias), 16);
        const __m256i qnan = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
        r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        const __m128i packed =
            _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    }
    FP_TARGET static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    FP_TARGET static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    FP_TARGET static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
    FP_TARGET static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
    FP_TARGET static inline F max(F a, F b) { return _mm256_max_ps(a, b); }
    FP_TARGET static inline float hmax(F a) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        return _mm_cvtss_f32(m);
    }
    FP_TARGET static inline double hsum(F a) {
        __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                                  _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
        __m128d s = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
        s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
        return _mm_cvtsd_f64(s);
    }
    FP_TARGET static inline F exp(F x) {
        x = _mm256_max_ps(_mm256_set1_ps(kExpLo), _mm256_min_ps(_mm256_set1_ps(kExpHi), x));
        const F n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        F r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
        F p = _mm256_set1_ps(kP0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
        const F y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
        // 2^n in two normal-float factors (see exp_scalar). NaN lanes give a
        // garbage exponent but y is NaN there, so the product stays NaN.
        const __m256i ni = _mm256_cvtps_epi32(n);
        const __m256i e1 = _mm256_srai_epi32(ni, 1);
        const __m256i e2 = _mm256_sub_epi32(ni, e1);
        const __m256i bias = _mm256_set1_epi32(127);
        const F s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, bias), 23));
        const F s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, bias), 23));
        return _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
    }
};
#include "rowpass_impl.inc"
#undef FP_TARGET
}  // namespace isa_avx2

// ---------------------------------------------------------------- AVX-512

namespace isa_avx512 {
#define FP_TARGET __attribute__((target("avx512f,avx2,fma")))
struct Vec {
    using F = __m512;
    static constexpr int64_t W = 16;
    FP_TARGET static inline F zero() { return _mm512_setzero_ps(); }
    FP_TARGET static inline F set1(float v) { return _mm512_set1_ps(v); }
    FP_TARGET static inline F load(const float* p) { return _mm512_loadu_ps(p); }
    FP_TARGET static inline F load(const uint16_t* p) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    FP_TARGET static inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
    // Integer RNE rather than vcvtneps2bf16: that one flushes denormals, torch does not.
    FP_TARGET static inline void store(uint16_t* p, F v) {
        const __m512i b = _mm512_castps_si512(v);
        const __m512i hi = _mm512_srli_epi32(b, 16);
        const __m512i bias = _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)),
                                              _mm512_set1_epi32(0x7fff));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, bias), 16);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    }
    FP_TARGET static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    FP_TARGET static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    FP_TARGET static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
    FP_TARGET static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    FP_TARGET static inline F max(F a, F b) { return _mm512_max_ps(a, b); }
    FP_TARGET static inline float hmax(F a) { return _mm512_reduce_max_ps(a); }
    FP_TARGET static inline double hsum(F a) {
        const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
        const __m512d d = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)), _mm512_cvtps_pd(hi));
        return _mm512_reduce_add_pd(d);
    }
    FP_TARGET static inline F exp(F x) {
        x = _mm512_max_ps(_mm512_set1_ps(kExpLo), _mm512_min_ps(_mm512_set1_ps(kExpHi), x));
        const F n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        F r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
        r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
        F p = _mm512_set1_ps(kP0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
        const F y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
        // scalef = y * 2^n with correct overflow to inf and gradual underflow.
        return _mm512_scalef_ps(y, n);
    }
};
#include "rowpass_impl.inc"
#undef FP_TARGET
}  // namespace isa_avx512
#endif  // FP_X86

// ---------------------------------------------------------------- ISA dispatch

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
static const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

static int best_isa() {
#if FP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
    return kScalar;
}

static const int g_best = best_isa();
static std::atomic<int> g_isa{g_best};  // overridable for tests

static const KernelSet& kernels_for(int isa) {
#if FP_X86
    if (isa == kAvx512) return isa_avx512::kernels;
    if (isa == kAvx2) return isa_avx2::kernels;
#endif
    (void)isa;
    return isa_scalar::kernels;
}

static std::vector<std::string> available_isas() {
    std::vector<std::string> out;
    for (int i = 0; i <= g_best; ++i) out.emplace_back(kIsaNames[i]);
    return out;
}

static std::string set_isa(const std::string& name) {
    const std::string prev = kIsaNames[g_isa.load()];
    int want = -1;
    if (name == "auto") want = g_best;
    for (int i = 0; i <= g_best; ++i)
        if (name == kIsaNames[i]) want = i;
    if (want < 0) throw std::invalid_argument("isa '" + name + "' is not available on this CPU");
    g_isa.store(want);
    return prev;
}

// ---------------------------------------------------------------- threading

// Below this many elements per thread, spawning a thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 16;

static void run_rows(KernelFn fn, const RowArgs& a, int64_t n, int64_t cols, int64_t num_threads) {
    if (n <= 0) return;
    int64_t t = std::min<int64_t>(num_threads, n);
    t = std::min<int64_t>(t, std::max<int64_t>(1, (n * std::max<int64_t>(cols, 1)) / kMinWorkPerThread));
    if (t <= 1) {
        fn(a, 0, n);
        return;
    }
    // contiguous, near-equal row ranges; this thread takes the first one
    const int64_t base = n / t, extra = n % t;
    auto range_end = [&](int64_t k) { return (k + 1) * base + std::min(k + 1, extra); };
    std::vector<std::thread> workers;
    workers.reserve(static_cast<size_t>(t - 1));
    for (int64_t k = 1; k < t; ++k) {
        const int64_t lo = range_end(k - 1), hi = range_end(k);
        try {
            workers.emplace_back(fn, std::cref(a), lo, hi);
        } catch (...) {
            fn(a, lo, hi);  // could not spawn a thread: do it here
        }
    }
    fn(a, 0, range_end(0));
    for (auto& w : workers) w.join();
}

// ---------------------------------------------------------------- argument checks

enum DType : int { kF32 = 0, kBF16 = 1 };

[[noreturn]] static void bad(const std::string& msg) { throw std::invalid_argument(msg); }

static void check_ptr(uintptr_t p, size_t align, const char* name, bool needed) {
    if (!needed) return;
    if (p == 0) bad(std::string(name) + ": null data pointer");
    if (p % align) bad(std::string(name) + ": data pointer is not aligned to its element size");
}

static size_t elem_size(int dtype) {
    if (dtype == kF32) return 4;
    if (dtype == kBF16) return 2;
    bad("dtype code must be 0 (float32) or 1 (bfloat16), got " + std::to_string(dtype));
}

static void check_scale(double scale) {
    const float s = static_cast<float>(scale);  // the kernels compute in fp32
    if (!(s > 0) || !std::isfinite(s)) bad("scale must be a finite float > 0 representable in float32");
}

static void check_common(uintptr_t x, int64_t ld, int64_t n, int64_t cols, int dtype,
                         int64_t num_threads, const char* cols_name) {
    const size_t es = elem_size(dtype);
    if (n < 0) bad("n must be >= 0");
    if (cols < 0) bad(std::string(cols_name) + " must be >= 0");
    if (n > 1 && ld < cols)
        bad("row stride (" + std::to_string(ld) + ") must be >= " + cols_name + " (" +
            std::to_string(cols) + ")");
    if (num_threads < 1) bad("num_threads must be >= 1");
    check_ptr(x, es, "logits", n > 0 && cols > 0);
}

// ---------------------------------------------------------------- entry points

static int64_t row_forward(uintptr_t logits, int64_t row_stride, int64_t n, int64_t V, int dtype,
                           uintptr_t labels, double scale, uintptr_t lse, uintptr_t target,
                           int64_t num_threads) {
    check_common(logits, row_stride, n, V, dtype, num_threads, "V");
    if (n > 0 && V < 1) bad("V must be >= 1");
    check_scale(scale);
    check_ptr(labels, 8, "labels", n > 0);
    check_ptr(lse, 4, "lse", n > 0);
    check_ptr(target, 4, "target", n > 0);
    if (n == 0) return 0;

    int64_t nbad = 0;
    RowArgs a;
    a.x = reinterpret_cast<void*>(logits);
    a.ld = row_stride;
    a.V = V;
    a.labels = reinterpret_cast<const int64_t*>(labels);
    a.scale = static_cast<float>(scale);
    a.lse_out = reinterpret_cast<float*>(lse);
    a.tgt_out = reinterpret_cast<float*>(target);
    a.nbad = &nbad;
    const KernelSet& k = kernels_for(g_isa.load());
    run_rows(dtype == kF32 ? k.fwd_f32 : k.fwd_bf16, a, n, V, num_threads);
    return nbad;
}

static void block_backward(uintptr_t logits, int64_t row_stride, int64_t n, int64_t vb, int dtype,
                           uintptr_t labels, uintptr_t lse, uintptr_t grad, double scale,
                           int64_t v_offset, int64_t num_threads) {
    check_common(logits, row_stride, n, vb, dtype, num_threads, "vb");
    check_scale(scale);
    if (v_offset < 0) bad("v_offset must be >= 0");
    check_ptr(labels, 8, "labels", n > 0);
    check_ptr(lse, 4, "lse", n > 0);
    check_ptr(grad, 4, "grad", n > 0);
    if (n == 0 || vb == 0) return;

    RowArgs a;
    a.x = reinterpret_cast<void*>(logits);
    a.ld = row_stride;
    a.V = vb;
    a.labels = reinterpret_cast<const int64_t*>(labels);
    a.scale = static_cast<float>(scale);
    a.lse_in = reinterpret_cast<const float*>(lse);
    a.grad = reinterpret_cast<const float*>(grad);
    a.v_off = v_offset;
    const KernelSet& k = kernels_for(g_isa.load());
    run_rows(dtype == kF32 ? k.bwd_f32 : k.bwd_bf16, a, n, vb, num_threads);
}

}  // namespace fastpref

PYBIND11_MODULE(_C, m) {
    using namespace fastpref;
    m.doc() = "fastpref CPU row pass (no libtorch: raw pointers, shapes, strides in elements).";
    m.attr("DTYPE_FLOAT32") = static_cast<int>(kF32);
    m.attr("DTYPE_BFLOAT16") = static_cast<int>(kBF16);

    m.def("row_forward", &row_forward, py::arg("logits_ptr"), py::arg("row_stride"), py::arg("n"),
          py::arg("V"), py::arg("dtype"), py::arg("labels_ptr"), py::arg("scale"), py::arg("lse_ptr"),
          py::arg("target_ptr"), py::arg("num_threads") = 1,
          py::call_guard<py::gil_scoped_release>(),
          "lse[i] = logsumexp(logits[i,:V]*scale), target[i] = logits[i,labels[i]]*scale (fp32 out).\n"
          "Returns the number of rows whose label was outside [0, V) (their target is NaN).");
    m.def("block_backward", &block_backward, py::arg("logits_ptr"), py::arg("row_stride"),
          py::arg("n"), py::arg("vb"), py::arg("dtype"), py::arg("labels_ptr"), py::arg("lse_ptr"),
          py::arg("grad_ptr"), py::arg("scale"), py::arg("v_offset"), py::arg("num_threads") = 1,
          py::call_guard<py::gil_scoped_release>(),
          "In place: logits[i,j] <- scale*grad[i]*([labels[i]==v_offset+j] - exp(logits[i,j]*scale - lse[i])).");
    m.def("isa", []() { return std::string(kIsaNames[g_isa.load()]); }, "SIMD variant in use.");
    m.def("available_isas", &available_isas, "SIMD variants this CPU can run.");
    m.def("_set_isa", &set_isa, py::arg("name"),
          "Force a SIMD variant ('scalar', 'avx2', 'avx512' or 'auto'); returns the previous one. For tests.");
}
