// CPU kernels for radgrad's hot paths: drawing sampled indices, gathering the
// kept values, scattering them back, and ReLU's 1-bit masks. Each is one pass
// over its data with no index tensor in between. radgrad/kernels.py holds a
// pure-torch twin of every kernel that gives the very same bits; the tests
// compare the two.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
// Entries per parallel task (torch's own grain for cheap elementwise work):
// smaller jobs run on one thread, where a fork-join would cost more than it saves.
constexpr int64_t kGrain = 32768;

// SplitMix64's output function.
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// NOTE [Counter-based indices] in radgrad/kernels.py: entry n of the stream
// `seed` is uniform on [0, d), exactly (Lemire's multiply-shift; a rejected
// draw, probability below d / 2^32, is redrawn from attempt + 1).
inline int64_t draw(uint64_t seed, uint64_t n, uint64_t d, uint64_t threshold) {
  for (uint64_t attempt = 0;; ++attempt) {
    const uint64_t m = (mix(seed + (n + 1 + (attempt << 40)) * kGolden) >> 32) * d;
    if ((m & 0xFFFFFFFFULL) >= threshold) return static_cast<int64_t>(m >> 32);
  }
}

void check_stream(int64_t rows, int64_t k, int64_t d) {
  TORCH_CHECK(d > 0 && d < (int64_t{1} << 32), "radgrad: rows of at most 2^32 - 1 entries, got ", d);
  TORCH_CHECK(k > 0 && rows * k < (int64_t{1} << 40), "radgrad: at most 2^40 sampled entries, got ", rows * k);
}

uint64_t threshold(int64_t d) {
  const uint32_t d32 = static_cast<uint32_t>(d);
  return static_cast<uint64_t>(static_cast<uint32_t>(-d32) % d32);
}

// Entries base .. base + count - 1 of the stream, into idx. The first
// attempts are computed in one branch-free (vectorizable) loop; the rare
// rejected entries are then redrawn one by one.
void fill_indices(uint64_t seed, uint64_t base, int64_t count, uint64_t d, uint64_t thr, int64_t* idx) {
  uint64_t rejected = 0;  // not a bool: gcc vectorizes an integer or-reduction
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t m = (mix(seed + (base + j + 1) * kGolden) >> 32) * d;
    idx[j] = static_cast<int64_t>(m >> 32);
    rejected |= static_cast<uint64_t>((m & 0xFFFFFFFFULL) < thr);
  }
  if (rejected)
    for (int64_t j = 0; j < count; ++j) idx[j] = draw(seed, base + j, d, thr);
}

// Calls body(r, idx) for every row r of [0, rows), idx its k sampled indices.
template <typename F>
void for_each_row(int64_t rows, int64_t k, int64_t d, bool per_example, int64_t seed, const F& body) {
  check_stream(rows, k, d);
  const uint64_t s = static_cast<uint64_t>(seed), thr = threshold(d);
  const int64_t row_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(k, 1));
  if (!per_example) {
    std::vector<int64_t> idx(k);
    fill_indices(s, 0, k, d, thr, idx.data());
    at::parallel_for(0, rows, row_grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) body(r, idx.data());
    });
    return;
  }
  at::parallel_for(0, rows, row_grain, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> idx(k);
    for (int64_t r = lo; r < hi; ++r) {
      fill_indices(s, static_cast<uint64_t>(r * k), k, d, thr, idx.data());
      body(r, idx.data());
    }
  });
}

at::Tensor sample_indices(int64_t rows, int64_t k, int64_t d, bool per_example, int64_t seed) {
  auto out = per_example ? at::empty({rows, k}, at::kLong) : at::empty({k}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for_each_row(per_example ? rows : 1, k, d, per_example, seed, [&](int64_t r, const int64_t* idx) {
    std::copy(idx, idx + k, p + r * k);
  });
  return out;
}

// values[r, j] = x[r, index(r, j)]
at::Tensor sample_pack(const at::Tensor& x, int64_t k, bool per_example, int64_t seed) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "radgrad: sample_pack wants a contiguous CPU matrix");
  const int64_t rows = x.size(0), d = x.size(1);
  auto out = at::empty({rows, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sample_pack", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for_each_row(rows, k, d, per_example, seed, [&](int64_t r, const int64_t* idx) {
      for (int64_t j = 0; j < k; ++j) dst[r * k + j] = src[r * d + idx[j]];
    });
  });
  return out;
}

// est = zeros(rows, d); est[r, index(r, j)] += values[r, j] * scale, in the
// order and the arithmetic of torch's mul then scatter_add_.
at::Tensor sample_unpack(const at::Tensor& values, int64_t d, bool per_example, int64_t seed, double scale) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(), "radgrad: sample_unpack wants a contiguous CPU matrix");
  const int64_t rows = values.size(0), k = values.size(1);
  auto est = at::zeros({rows, d}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "sample_unpack", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t factor = static_cast<opmath_t>(scale);
    const scalar_t* v = values.data_ptr<scalar_t>();
    scalar_t* e = est.data_ptr<scalar_t>();
    for_each_row(rows, k, d, per_example, seed, [&](int64_t r, const int64_t* idx) {
      scalar_t* row = e + r * d;
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t scaled = static_cast<scalar_t>(static_cast<opmath_t>(v[r * k + j]) * factor);
        row[idx[j]] = static_cast<scalar_t>(static_cast<opmath_t>(row[idx[j]]) + static_cast<opmath_t>(scaled));
      }
    });
  });
  return est;
}

// The unsigned integer with the bits of a scalar_t.
template <typename T> struct Bits;
template <> struct Bits<float> { using type = uint32_t; };
template <> struct Bits<double> { using type = uint64_t; };
template <> struct Bits<at::BFloat16> { using type = uint16_t; };
template <> struct Bits<at::Half> { using type = uint16_t; };

// One bit per entry, set where x != 0 (NaN included, -0.0 not): numpy's
// packbits layout, little bit order. Written on the bit patterns (all bits
// but the sign zero means +-0.0) so the compiler vectorizes it.
at::Tensor pack_nonzero(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "radgrad: pack_nonzero wants a contiguous CPU tensor");
  const int64_t n = x.numel(), full = n / 8, bytes = (n + 7) / 8;
  auto out = at::empty({bytes}, x.options().dtype(at::kByte));
  uint8_t* dst = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pack_nonzero", [&] {
    using U = typename Bits<scalar_t>::type;
    constexpr U magnitude = static_cast<U>(std::numeric_limits<U>::max() >> 1);
    const U* src = reinterpret_cast<const U*>(x.data_ptr<scalar_t>());
    at::parallel_for(0, full, kGrain / 8, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        uint8_t byte = 0;
        for (int i = 0; i < 8; ++i) byte |= static_cast<uint8_t>((src[8 * b + i] & magnitude) != 0) << i;
        dst[b] = byte;
      }
    });
    if (full < bytes) {
      uint8_t byte = 0;
      for (int64_t i = 8 * full; i < n; ++i) byte |= static_cast<uint8_t>((src[i] & magnitude) != 0) << (i - 8 * full);
      dst[full] = byte;
    }
  });
  return out;
}

// grad where the bit is set, else +0.0 (also for a NaN grad): torch's
// threshold_backward on the mask, as a bitwise and of the patterns.
at::Tensor masked_grad(const at::Tensor& grad, const at::Tensor& packed) {
  TORCH_CHECK(grad.is_contiguous() && grad.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "radgrad: masked_grad wants a contiguous CPU grad and packed bytes");
  const int64_t n = grad.numel();
  TORCH_CHECK(packed.numel() == (n + 7) / 8, "radgrad: mask of ", packed.numel(), " bytes for ", n, " entries");
  auto out = at::empty_like(grad);
  const uint8_t* bits = packed.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "masked_grad", [&] {
    using U = typename Bits<scalar_t>::type;
    const U* g = reinterpret_cast<const U*>(grad.data_ptr<scalar_t>());
    U* o = reinterpret_cast<U*>(out.data_ptr<scalar_t>());
    auto keep = [](U value, uint8_t byte, int i) { return static_cast<U>(value & (U(0) - ((byte >> i) & 1))); };
    const int64_t full = n / 8;
    at::parallel_for(0, full, kGrain / 8, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b)
        for (int i = 0; i < 8; ++i) o[8 * b + i] = keep(g[8 * b + i], bits[b], i);
    });
    for (int64_t i = 8 * full; i < n; ++i) o[i] = keep(g[i], bits[full], static_cast<int>(i - 8 * full));
  });
  return out;
}

// A seed from torch's default CPU generator: the same number as
// torch.randint(2**62, (1,)).item() would give, without a tensor.
int64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(at::check_generator<at::CPUGeneratorImpl>(gen)->random64() % (uint64_t{1} << 62));
}

}  // namespace

// Named, not anonymous: autograd shows these class names in grad_fn.
namespace radgrad {

// radgrad.functional.linear with method="sample" on the CPU, as one autograd
// node: the twin of _Linear in functional.py, with the same ops in the same
// order (so the same bits), minus the Python overhead of a custom Function.
class SampledLinear : public torch::autograd::Function<SampledLinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, int64_t k, bool per_example, int64_t seed) {
    const int64_t d = input.size(-1);
    ctx->save_for_backward({sample_pack(input.reshape({-1, d}).contiguous(), k, per_example, seed), weight});
    ctx->saved_data["d"] = d;
    ctx->saved_data["per_example"] = per_example;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return at::linear(input, weight, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "radgrad: double backward (create_graph=True) through a RAD op is not supported: its saved input "
                "is a random sketch, so a second derivative would be silently wrong. Use keep=1.0 or exclude this "
                "layer from convert().");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& values = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& grad = grads[0];
    const at::Tensor grad2d = grad.dim() == 2 ? grad : grad.reshape({-1, grad.size(-1)});
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) grad_input = grad.matmul(weight);
    if (ctx->needs_input_grad(1)) {
      const int64_t d = ctx->saved_data["d"].toInt();
      const at::Tensor estimate = sample_unpack(values, d, ctx->saved_data["per_example"].toBool(),
                                                ctx->saved_data["seed"].toInt(), static_cast<double>(d) / values.size(1));
      grad_weight = grad2d.t().mm(estimate);
    }
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = grad2d.sum(0);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor sampled_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          int64_t k, bool per_example, int64_t seed) {
  return SampledLinear::apply(input, weight, bias, k, per_example, seed);
}

// radgrad.functional.relu on the CPU as one autograd node: the twin of
// _ReLU in functional.py. Under create_graph the backward is built from
// differentiable ops, so a second derivative stays exact.
class MaskedReLU : public torch::autograd::Function<MaskedReLU> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input) {
    at::Tensor output = at::relu(input);
    ctx->save_for_backward({pack_nonzero(output)});
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor packed = ctx->get_saved_variables()[0];
    const at::Tensor& grad = grads[0];
    if (at::GradMode::is_enabled()) {
      const at::Tensor passes = masked_grad(at::ones_like(grad, at::MemoryFormat::Contiguous), packed).to(at::kBool);
      return {at::where(passes, grad, at::zeros({}, grad.options()))};
    }
    return {masked_grad(grad.contiguous(), packed)};
  }
};

at::Tensor masked_relu(const at::Tensor& input) { return MaskedReLU::apply(input); }

}  // namespace radgrad

TORCH_LIBRARY(radgrad, m) {
  m.def("sample_indices(int rows, int k, int d, bool per_example, int seed) -> Tensor", &sample_indices);
  m.def("sample_pack(Tensor x, int k, bool per_example, int seed) -> Tensor", &sample_pack);
  m.def("sample_unpack(Tensor values, int d, bool per_example, int seed, float scale) -> Tensor", &sample_unpack);
  m.def("pack_nonzero(Tensor x) -> Tensor", &pack_nonzero);
  m.def("masked_grad(Tensor grad, Tensor packed) -> Tensor", &masked_grad);
  m.def("draw_seed() -> int", &draw_seed);
  m.def("masked_relu(Tensor input) -> Tensor", &radgrad::masked_relu);
  m.def("sampled_linear(Tensor input, Tensor weight, Tensor? bias, int k, bool per_example, int seed) -> Tensor",
        &radgrad::sampled_linear);
}
