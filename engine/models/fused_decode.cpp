// Every layer of a pure decode step in one C++ call: the same ATen ops as LayerPlan.forward, without
// the Python between them. See fused_decode.py.
#include <torch/extension.h>

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

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{-1}, true, at::kFloat);
  at::Tensor scale =
      at::addcmul(at::scalar_tensor(eps, norm.options()), norm, norm, 1.0 / x.size(-1)).rsqrt_();
  return weight * (x * scale).to(x.scalar_type());
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor xf = x.to(at::kFloat);
  return at::addcmul(xf * cos, xf.roll({x.size(-1) / 2}, {-1}), sin).to(x.scalar_type());
}

class FusedDecoder {
 public:
  FusedDecoder(std::vector<at::Tensor> norms, std::vector<int64_t> kinds, std::vector<at::Tensor> tensors,
               std::vector<int64_t> ints, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t intermediate_size, double eps)
      : heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), inter_(intermediate_size), eps_(eps) {
    const size_t n = norms.size() / 2;
    TORCH_CHECK(kinds.size() == 4 * n && tensors.size() == 16 * n && ints.size() == 8 * n, "spec sizes");
    for (size_t i = 0; i < n; ++i) {
      auto mm = [&](size_t j) {
        size_t k = 4 * i + j;
        auto t = [&](size_t m) { return tensors[4 * k + m].numel() ? tensors[4 * k + m] : at::Tensor(); };
        return Matmul{kinds[k], t(0), t(1), t(2), t(3), ints[2 * k], ints[2 * k + 1]};
      };
      layers_.push_back(Layer{norms[2 * i], norms[2 * i + 1], mm(0), mm(1), mm(2), mm(3)});
    }
  }

  // x: [B, hidden], one new token of each of B sequences; cos, sin: [B, 1, head_dim] fp32; k_pool, v_pool:
  // [layers, slots, kv_heads, head_dim]; slot_mapping: [B]; kv_slots: [B, K]; mask: [B, 1, 1, K] or None.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pool,
                     const at::Tensor& v_pool, const at::Tensor& slot_mapping, const at::Tensor& kv_slots,
                     const std::optional<at::Tensor>& mask) const {
    at::NoGradGuard no_grad;
    const int64_t B = kv_slots.size(0), K = kv_slots.size(1), H = heads_, KVH = kv_heads_, D = head_dim_;
    const at::Tensor slots = kv_slots.view({-1});
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      at::Tensor qkv = l.qkv(rms_norm(x, l.input_norm, eps_));  // [B, (H + 2 KVH) D]
      at::Tensor qk = apply_rotary(qkv.slice(1, 0, (H + KVH) * D).view({B, H + KVH, D}), cos, sin);
      at::Tensor v = qkv.slice(1, (H + KVH) * D).view({B, KVH, D});
      at::Tensor k_cache = k_pool.select(0, i), v_cache = v_pool.select(0, i);
      k_cache.index_copy_(0, slot_mapping, qk.slice(1, H));
      v_cache.index_copy_(0, slot_mapping, v);
      at::Tensor q = qk.slice(1, 0, H).view({B, KVH, H / KVH, D});
      at::Tensor keys = k_cache.index_select(0, slots).view({B, K, KVH, D}).transpose(1, 2);
      at::Tensor values = v_cache.index_select(0, slots).view({B, K, KVH, D}).transpose(1, 2);
      at::Tensor out = at::scaled_dot_product_attention(q, keys, values, mask);
      x = x + l.o(out.reshape({B, H * D}));
      at::Tensor gate_up = l.gate_up(rms_norm(x, l.post_norm, eps_));
      x = x + l.down(at::silu(gate_up.slice(1, 0, inter_)) * gate_up.slice(1, inter_));
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
