// Every layer of a pure decode step in one C++ call; see fused_decode.py. The projections are the ATen
// ops LayerPlan.forward calls; norms, rotary embedding, KV writes, residual adds and the attention
// over the paged caches are loops here (the same fp32 arithmetic, summed in other orders).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// One projection as QuantizedLinear / nn.Linear / PackedLinear compute it.
struct Matmul {
  int64_t kind;  // 0 dense at::linear, 1 int4 (groups along K), 2 int8 (per row), 3 oneDNN packed
  at::Tensor weight, scales, bias, dense;  // undefined where a kind has none
  int64_t group_size, max_rows;

  at::Tensor operator()(const at::Tensor& x) const {
    std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    if (kind == 0) return at::linear(x, weight, b);
    if (kind == 3) return packed(x, b);
    if (x.size(0) > max_rows) return at::linear(x, dense, b);
    at::Tensor out = kind == 1 ? at::_weight_int4pack_mm_for_cpu(x, weight, group_size, scales)
                               : at::_weight_int8pack_mm(x, weight, scales);
    return bias.defined() ? out + bias : out;
  }

  at::Tensor packed(const at::Tensor& x, const std::optional<at::Tensor>& b) const {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, weight, b, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                            std::optional<std::string>(std::string(""))};
    op.callBoxed(&stack);
    return stack[0].toTensor();
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Matmul qkv, o, gate_up, down;
};

// x[r] += delta[r] (when given, rounded to T as a T tensor add is), then, when weight is given,
// out[r] = weight * T(x[r] * rsqrt(mean(x[r]^2) + eps)) with fp32 statistics, as llama.rms_norm.
template <typename T>
void add_rms_norm_rows(T* x, const T* delta, const T* weight, T* out, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * dim;
    if (delta != nullptr) {
      const T* dr = delta + r * dim;
      for (int64_t i = 0; i < dim; ++i) xr[i] = T(float(xr[i]) + float(dr[i]));
    }
    if (weight == nullptr) continue;
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; ++i) sum += float(xr[i]) * float(xr[i]);
    const float scale = 1.0f / std::sqrt(sum / dim + eps);
    T* o = out + r * dim;
    for (int64_t i = 0; i < dim; ++i) o[i] = T(float(T(float(xr[i]) * scale)) * float(weight[i]));
  }
}

// The residual stream x ([B, hidden], updated in place) plus delta, and its norm with weight (an
// undefined result where weight is undefined).
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  at::Tensor out = weight.defined() ? at::empty_like(x) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), delta.defined() ? delta.data_ptr<scalar_t>() : nullptr,
                                weight.defined() ? weight.data_ptr<scalar_t>() : nullptr,
                                out.defined() ? out.data_ptr<scalar_t>() : nullptr, x.size(0), x.size(1), eps);
  });
  return out;
}

constexpr int64_t kMaxHeadDim = 1024;

// Rotates the q and k heads of qkv [B, (H + 2 KVH) D] in place (rotate_half's layout, fp32 math, cos
// and signed sin tables as llama.Rotary builds them: [B, D] fp32), then copies each row's k and v
// heads into its slot of the layer's caches [slots, KVH, D].
template <typename T>
void rope_and_store_rows(T* qkv, const float* cos, const float* sin, T* k_cache, T* v_cache,
                         const int64_t* slots, int64_t B, int64_t H, int64_t KVH, int64_t D) {
  const int64_t width = (H + 2 * KVH) * D, half = D / 2;
  float head[kMaxHeadDim];
  for (int64_t b = 0; b < B; ++b, qkv += width, cos += D, sin += D) {
    for (int64_t h = 0; h < H + KVH; ++h) {
      T* x = qkv + h * D;
      for (int64_t i = 0; i < D; ++i) head[i] = float(x[i]);
      for (int64_t i = 0; i < half; ++i) x[i] = T(head[i] * cos[i] + head[i + half] * sin[i]);
      for (int64_t i = half; i < D; ++i) x[i] = T(head[i] * cos[i] + head[i - half] * sin[i]);
    }
    std::memcpy(k_cache + slots[b] * KVH * D, qkv + H * D, KVH * D * sizeof(T));
    std::memcpy(v_cache + slots[b] * KVH * D, qkv + (H + KVH) * D, KVH * D * sizeof(T));
  }
}

// e^x for x <= 0 (scores minus their maximum), in a form compilers vectorize: 2^(x log2 e) as 2^n 2^f,
// n = round(x log2 e), |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error < 2e-7).
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504f;
  const float n = std::nearbyint(t), f = t - n;
  float p = 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {  // the bits, shifted: what c10's conversion does, vectorizable
  const uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int64_t kMaxGroup = 16;  // query heads per KV head the paged kernel takes (GQA groups)

// Decode attention straight from the paged caches [slots, KVH, D], no gathered copy: for each row b,
// its KV head kh's G query heads (qkv [B, (H + 2 KVH) D], q heads first, head kh*G + g) against
// the row's first lengths[b] keys (kv_slots [B, K]), softmax in fp32. Work items are (row, KV head,
// share of the keys): a long context is split so both cores work on one row; each share keeps its
// own maximum, sum and weighted values, merged by log-sum-exp after, with the attention to a shared
// prefix where there is one (prefix_out [KVH, B, G, D] fp32, normalized; prefix_lse [KVH, B, G]).
// out: [B, H D].
template <typename T, int64_t kDim>  // kDim: the head dim as a constant (loops the compiler unrolls), or 0
void paged_decode_attention(const T* qkv, const T* k_cache, const T* v_cache, const int64_t* kv_slots,
                            const int64_t* lengths, const float* prefix_out, const float* prefix_lse, T* out,
                            int64_t B, int64_t K, int64_t H, int64_t KVH, int64_t head_dim) {
  const int64_t D = kDim ? kDim : head_dim;
  const int64_t G = H / KVH, width = (H + 2 * KVH) * D, heads = B * KVH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t threads = at::get_num_threads();
  const int64_t splits = heads >= 2 * threads || K < 256 ? 1 : std::min<int64_t>(K / 128, -(-2 * threads / heads));
  const int64_t items = heads * splits;
  std::vector<float> acc(items * G * D), top(items * G), sums(items * G);
  // Threads only where there is work enough to pay for waking them.
  const int64_t grain = B * K * KVH < 4096 ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * K), q(G * D), key(D), value(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (KVH * splits), kh = item / splits % KVH, share = item % splits;
      const int64_t lo = lengths[b] * share / splits, hi = lengths[b] * (share + 1) / splits;
      const T* qrow = qkv + b * width + kh * G * D;
      for (int64_t i = 0; i < G * D; ++i) q[i] = to_float(qrow[i]) * scale;
      const int64_t* slots = kv_slots + b * K;
      float* m = top.data() + item * G;
      std::fill(m, m + G, -std::numeric_limits<float>::max());
      for (int64_t j = lo; j < hi; ++j) {
        const T* k = k_cache + (slots[j] * KVH + kh) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) key[d] = to_float(k[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = q.data() + g * D;
          float s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * key[d];
          scores[g * K + j] = s;
          m[g] = std::max(m[g], s);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* p = scores.data() + g * K;
        const float mg = m[g];
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = lo; j < hi; ++j) {
          p[j] = exp_nonpositive(p[j] - mg);
          sum += p[j];
        }
        sums[item * G + g] = sum;
      }
      float* a = acc.data() + item * G * D;
      std::fill(a, a + G * D, 0.0f);
      for (int64_t j = lo; j < hi; ++j) {
        const T* v = v_cache + (slots[j] * KVH + kh) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) value[d] = to_float(v[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * K + j];
          float* ag = a + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += w * value[d];
        }
      }
    }
  });
  std::vector<float> merged(D);
  for (int64_t head = 0; head < heads; ++head) {  // head = b * KVH + kh; its items are consecutive
    const int64_t b = head / KVH, kh = head % KVH;
    for (int64_t g = 0; g < G; ++g) {
      float mg = -std::numeric_limits<float>::max(), total = 0;
      for (int64_t share = 0; share < splits; ++share) mg = std::max(mg, top[(head * splits + share) * G + g]);
      // The shared prefix's attention (cascade), normalized: weight e^lse in the merge.
      const int64_t shared = (kh * B + b) * G + g;
      if (prefix_out) mg = std::max(mg, prefix_lse[shared]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t share = 0; share < splits; ++share) {
        const int64_t at = (head * splits + share) * G + g;
        const float w = sums[at] > 0 ? std::exp(top[at] - mg) : 0.0f;  // a share with no keys weighs 0
        total += w * sums[at];
        for (int64_t d = 0; d < D; ++d) merged[d] += w * acc[at * D + d];
      }
      if (prefix_out) {
        const float w = std::exp(prefix_lse[shared] - mg);
        total += w;
        for (int64_t d = 0; d < D; ++d) merged[d] += w * prefix_out[shared * D + d];
      }
      T* o = out + b * H * D + (kh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = T(merged[d] / total);
    }
  }
}

class FusedDecoder {
 public:
  FusedDecoder(std::vector<at::Tensor> norms, std::vector<int64_t> kinds, std::vector<at::Tensor> tensors,
               std::vector<int64_t> ints, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t intermediate_size, double eps)
      : heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), inter_(intermediate_size), eps_(eps) {
    const size_t n = norms.size() / 2;
    TORCH_CHECK(n > 0 && kinds.size() == 4 * n && tensors.size() == 16 * n && ints.size() == 8 * n, "spec sizes");
    TORCH_CHECK(head_dim <= kMaxHeadDim && head_dim % 2 == 0 && num_heads % num_kv_heads == 0 &&
                    num_heads / num_kv_heads <= kMaxGroup,
                "head shapes");
    for (size_t i = 0; i < n; ++i) {
      auto mm = [&](size_t j) {
        size_t k = 4 * i + j;
        auto t = [&](size_t m) { return tensors[4 * k + m].numel() ? tensors[4 * k + m] : at::Tensor(); };
        return Matmul{kinds[k], t(0), t(1), t(2), t(3), ints[2 * k], ints[2 * k + 1]};
      };
      layers_.push_back(Layer{norms[2 * i], norms[2 * i + 1], mm(0), mm(1), mm(2), mm(3)});
    }
  }

  // x: [B, hidden], the embedded new token of each of B sequences; cos, sin: [B, 1, head_dim] fp32;
  // k_pool, v_pool: [layers, slots, kv_heads, head_dim]; slot_mapping: [B] int64, where each new
  // token's K/V goes; kv_slots: [B, K] int64, every key of each row (padded) after the prefix_slots
  // [P] int64 every row shares, if any (cascade); mask: [B, 1, 1, K] bool (True = attend), or an
  // additive bias with a prefix, or None. Returns the residual stream after the last layer (before
  // the final norm).
  at::Tensor forward(const at::Tensor& embedded, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& slot_mapping,
                     const at::Tensor& kv_slots, const std::optional<at::Tensor>& mask,
                     const std::optional<at::Tensor>& prefix_slots) const {
    at::NoGradGuard no_grad;
    const int64_t B = kv_slots.size(0), K = kv_slots.size(1), H = heads_, KVH = kv_heads_, D = head_dim_;
    TORCH_CHECK(embedded.dim() == 2 && embedded.size(0) == B && slot_mapping.numel() == B, "one token a row");
    TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.size(0) == int64_t(layers_.size()),
                "KV pools: contiguous, one entry a layer");
    TORCH_CHECK(k_pool.scalar_type() == embedded.scalar_type() && cos.scalar_type() == at::kFloat, "dtypes");
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && kv_slots.scalar_type() == at::kLong, "int64 slots");
    const at::Tensor targets = slot_mapping.contiguous(), slot_table = kv_slots.contiguous();
    const at::Tensor c = cos.contiguous(), s = sin.contiguous();
    // Keys per row: the mask's leading run of True (bool) or of 0 (an additive bias, as prepare builds
    // it for a cascade); ModelRunner.prepare pads each row's keys at its end.
    std::vector<int64_t> lengths(B, K);
    if (mask) {
      const at::Tensor attend = mask->scalar_type() == at::kBool ? *mask : mask->eq(0);
      const at::Tensor m = attend.reshape({B, K}).contiguous();
      const bool* row = m.data_ptr<bool>();
      for (int64_t b = 0; b < B; ++b, row += K) lengths[b] = std::find(row, row + K, false) - row;
    }
    const at::Tensor none;
    at::Tensor x = embedded.clone(at::MemoryFormat::Contiguous);  // the residual stream, updated in place
    at::Tensor h = add_rms_norm(x, none, layers_[0].input_norm, eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      at::Tensor qkv = l.qkv(h).contiguous();  // [B, (H + 2 KVH) D]
      at::Tensor k_cache = k_pool.select(0, i), v_cache = v_pool.select(0, i);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_and_store", [&] {
        rope_and_store_rows<scalar_t>(qkv.data_ptr<scalar_t>(), c.data_ptr<float>(), s.data_ptr<float>(),
                                      k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                      targets.data_ptr<int64_t>(), B, H, KVH, D);
      });
      at::Tensor prefix_out, prefix_lse;
      if (prefix_slots) {  // cascade: the shared keys gathered once, every row's queries in one flash call
        const int64_t G = H / KVH;
        at::Tensor q = qkv.slice(1, 0, H * D).view({B, KVH, G, D}).transpose(0, 1).reshape({1, KVH, B * G, D});
        at::Tensor pk = k_cache.index_select(0, *prefix_slots).transpose(0, 1).unsqueeze(0);  // [1, KVH, P, D]
        at::Tensor pv = v_cache.index_select(0, *prefix_slots).transpose(0, 1).unsqueeze(0);
        auto flash = at::_scaled_dot_product_flash_attention_for_cpu(q, pk, pv);
        prefix_out = std::get<0>(flash).to(at::kFloat).contiguous();  // [1, KVH, B G, D]
        prefix_lse = std::get<1>(flash).to(at::kFloat).contiguous();  // [1, KVH, B G]
      }
      at::Tensor out = at::empty({B, H * D}, qkv.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "paged_decode_attention", [&] {
        auto attend = D == 64 ? paged_decode_attention<scalar_t, 64>
                      : D == 128 ? paged_decode_attention<scalar_t, 128>
                                 : paged_decode_attention<scalar_t, 0>;
        attend(qkv.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
               slot_table.data_ptr<int64_t>(), lengths.data(),
               prefix_out.defined() ? prefix_out.data_ptr<float>() : nullptr,
               prefix_lse.defined() ? prefix_lse.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), B, K, H,
               KVH, D);
      });
      h = add_rms_norm(x, l.o(out), l.post_norm, eps_);
      at::Tensor gate_up = l.gate_up(h);
      at::Tensor act = at::silu(gate_up.slice(1, 0, inter_)) * gate_up.slice(1, inter_);
      const bool last = i + 1 == layers_.size();
      h = add_rms_norm(x, l.down(act), last ? none : layers_[i + 1].input_norm, eps_);
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_, inter_;
  double eps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<FusedDecoder>(m, "FusedDecoder")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                          std::vector<int64_t>, int64_t, int64_t, int64_t, int64_t, double>())
      // The step's ATen kernels need no Python: the server's event loop runs while they do.
      .def("forward", &FusedDecoder::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
