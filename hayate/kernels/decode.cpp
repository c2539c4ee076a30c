// A Llama-family decode step planned once at start-up and run as one native call: the
// embedding lookup, every layer (RMSNorm, fused QKV, QK-norm where a layer has it, RoPE, the
// KV-cache write, attention over the paged cache, the output projection, the SwiGLU MLP,
// residuals), the final norm and the
// vocabulary projection, for up to kMaxRows rows: each a token at its position (decodes, or
// the consecutive tokens of a short prompt chunk, which see each other causally). Gemma 3's
// differences are settings: a scaled embedding, norms on the attention's and the MLP's
// outputs, GeGLU, a query scale, and sliding-window layers with their own RoPE tables.
//
// Weights, the KV cache and all scratch buffers are fixed at construction; a step allocates
// only its logits, and runs on the plan's own threads. The projections run the VNNI kernel
// over rearranged weights where the CPU has it (interleaved.h, interleaved_kernel.h), else the operators' own
// GEMV (gemv_into); norms and RoPE are the operators' (rms_norm_rows, rope_heads); attention
// is split-K (decode_attention.h), over a KV cache of float, float16 or bfloat16 (kv_elements.h).
#include "activations.h"
#include "decode_attention.h"
#include "routed_experts.h"

namespace {

struct Layer {
  torch::Tensor input_norm, post_norm;  // float32 [hidden]: before the attention, before the MLP
  torch::Tensor attention_out_norm, mlp_out_norm;  // float32 [hidden] on their outputs (Gemma), or undefined
  torch::Tensor q_norm, k_norm;         // float32 [head_dim] (per-head QK-norm), or undefined
  bool full_qk_norm = false;            // q_norm and k_norm over the whole projections (OLMoE)
  float clip = 0.f;                     // q, k and v clamped to [-clip, clip] (OLMoE; 0: not)
  torch::Tensor cos, sin;               // its RoPE tables [positions, head_dim]
  float scale = 1.f;                    // the attention scores' scale
  int64_t window = 0;                   // a sliding-window layer's window (0: every key)
  PackedMatrix qkv, o, gate_up, down;   // gate_up and down empty in a mixture of experts' layer
  RoutedExperts experts;                 // defined only there
};

// An optional float32 [size] norm weight, contiguous, or an undefined tensor.
torch::Tensor norm_weight(const c10::optional<torch::Tensor>& weight, int64_t size, const char* name) {
  if (!weight.has_value()) return torch::Tensor();
  TORCH_CHECK(weight->dtype() == torch::kFloat32 && weight->numel() == size, name, " must be float32 [", size, "]");
  return weight->contiguous();
}

class DecodePlan {
 public:
  // embedding: float32 [vocab, hidden], or (embedding_type a GGML type) its GGUF blocks, uint8
  // [vocab, row bytes], a row decoded per token, then multiplied by embedding_scale. gelu:
  // the MLPs are GeGLU (tanh's GELU), else SwiGLU.
  DecodePlan(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, torch::Tensor embedding,
             torch::Tensor cos, torch::Tensor sin, torch::Tensor final_norm, torch::Tensor kv_cache,
             int64_t block_size, int64_t threads, int64_t embedding_type, double embedding_scale, bool gelu)
      : threads_(static_cast<int>(threads)), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)),
        embedding_scale_(static_cast<float>(embedding_scale)), activation_(gated_activation(gelu)),
        embedding_(embedding.contiguous()), embedding_type_(embedding_type), cos_(cos.contiguous()), sin_(sin.contiguous()),
        final_norm_(final_norm.contiguous()), kv_cache_(kv_cache), block_size_(block_size),
        attention_(heads, kv_heads, head_dim, block_size), write_and_attend_(write_and_attend_for(kv_cache)) {
    TORCH_CHECK(embedding_.dim() == 2, "embedding must be [vocab, hidden] (or its rows' blocks)");
    if (embedding_type_ == 0) {
      TORCH_CHECK(embedding_.dtype() == torch::kFloat32, "an unpacked embedding must be float32");
      hidden_ = embedding_.size(1);
    } else {
      TORCH_CHECK(embedding_.dtype() == torch::kUInt8, "a packed embedding must be uint8 blocks");
      const BlockFormat format = block_format(embedding_type_);
      TORCH_CHECK(embedding_.size(1) % format.bytes == 0, "embedding rows are not whole blocks");
      hidden_ = embedding_.size(1) / format.bytes * format.elements;
    }
    TORCH_CHECK(kv_cache_.is_contiguous() && kv_cache_.dim() == 5,
                "the KV cache must be contiguous [layers, 2, rows, kv_heads, head_dim]");
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads must group evenly onto kv_heads");
  }

  // Each projection: a weight and its type, or lists of them side by side (see PackedMatrix).
  // q_norm, k_norm: per head [head_dim], or over the whole projections [heads * head_dim],
  // [kv_heads * head_dim]; clip: q, k and v clamped after them (0: not). scale: the scores'
  // (0: 1 / sqrt(head_dim)); window: a sliding-window layer's (0: none); cos, sin: the layer's
  // own RoPE tables (default: the plan's).
  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, pybind11::object qkv, pybind11::object qkv_type,
                 c10::optional<torch::Tensor> qkv_bias, pybind11::object o, pybind11::object o_type,
                 c10::optional<torch::Tensor> o_bias, pybind11::object gate_up, pybind11::object gate_up_type,
                 c10::optional<torch::Tensor> gate_up_bias, pybind11::object down, pybind11::object down_type,
                 c10::optional<torch::Tensor> down_bias, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, c10::optional<torch::Tensor> attention_out_norm,
                 c10::optional<torch::Tensor> mlp_out_norm, double scale, int64_t window,
                 c10::optional<torch::Tensor> cos, c10::optional<torch::Tensor> sin, double clip) {
    Layer layer;
    layer.input_norm = input_norm.contiguous();
    layer.post_norm = post_norm.contiguous();
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "QK-norm needs both q_norm and k_norm");
    layer.full_qk_norm = q_norm.has_value() && q_norm->numel() != head_dim_;
    layer.q_norm = norm_weight(q_norm, layer.full_qk_norm ? heads_ * head_dim_ : head_dim_, "q_norm");
    layer.k_norm = norm_weight(k_norm, layer.full_qk_norm ? kv_heads_ * head_dim_ : head_dim_, "k_norm");
    TORCH_CHECK(clip >= 0, "clip must be >= 0");
    layer.clip = static_cast<float>(clip);
    layer.attention_out_norm = norm_weight(attention_out_norm, hidden_, "attention_out_norm");
    layer.mlp_out_norm = norm_weight(mlp_out_norm, hidden_, "mlp_out_norm");
    layer.scale = scale > 0 ? static_cast<float>(scale) : 1.f / std::sqrt(static_cast<float>(head_dim_));
    TORCH_CHECK(window >= 0 && cos.has_value() == sin.has_value(), "a window >= 0, and cos with sin");
    layer.window = window;
    layer.cos = cos.has_value() ? cos->contiguous() : cos_;
    layer.sin = sin.has_value() ? sin->contiguous() : sin_;
    TORCH_CHECK(layer.cos.sizes() == cos_.sizes() && layer.sin.sizes() == sin_.sizes() &&
                    layer.cos.dtype() == torch::kFloat32 && layer.sin.dtype() == torch::kFloat32,
                "a layer's RoPE tables must be float32, shaped as the plan's");
    layer.qkv = PackedMatrix(qkv, qkv_type, hidden_, qkv_bias);
    layer.o = PackedMatrix(o, o_type, heads_ * head_dim_, o_bias);
    if (!gate_up.is_none()) {   // else add_experts() gives the layer its MLP
      layer.gate_up = PackedMatrix(gate_up, gate_up_type, hidden_, gate_up_bias);
      layer.down = PackedMatrix(down, down_type, layer.gate_up.N / 2, down_bias);
      TORCH_CHECK(layer.down.N == hidden_, "projections must return the hidden size");
    }
    TORCH_CHECK(layer.qkv.N == (heads_ + 2 * kv_heads_) * head_dim_, "fused qkv has the wrong width");
    TORCH_CHECK(layer.o.N == hidden_, "projections must return the hidden size");
    layers_.push_back(std::move(layer));
  }

  // The last added layer's MLP as a mixture of experts: router float32 [experts, hidden]; per
  // expert, its gate and up side by side (lists of weights and types) and its down; a shared
  // expert's (Qwen2-MoE) likewise, with its gate float32 [hidden], or None.
  void add_experts(torch::Tensor router, int64_t top_k, bool normalize, const std::vector<pybind11::object>& gate_up,
                   const std::vector<pybind11::object>& gate_up_types, const std::vector<pybind11::object>& down,
                   const std::vector<pybind11::object>& down_types, const pybind11::object& shared_gate_up,
                   const pybind11::object& shared_gate_up_types, const pybind11::object& shared_down,
                   const pybind11::object& shared_down_type, c10::optional<torch::Tensor> shared_gate) {
    TORCH_CHECK(!layers_.empty() && layers_.back().gate_up.N == 0 && !layers_.back().experts.defined(),
                "experts go to a layer added without a dense MLP");
    TORCH_CHECK(router.dtype() == torch::kFloat32 && router.dim() == 2 && router.size(1) == hidden_,
                "the router must be float32 [experts, hidden]");
    const size_t count = static_cast<size_t>(router.size(0));
    TORCH_CHECK(gate_up.size() == count && gate_up_types.size() == count && down.size() == count &&
                    down_types.size() == count && top_k >= 1 && top_k <= router.size(0),
                "one gate_up and one down per expert, and 1 <= top_k <= experts");
    RoutedExperts& experts = layers_.back().experts;
    experts.router = router.contiguous();
    experts.top_k = top_k;
    experts.normalize = normalize;
    for (size_t e = 0; e < count; ++e) {
      experts.gate_up.emplace_back(gate_up[e], gate_up_types[e], hidden_, c10::nullopt);
      experts.down.emplace_back(down[e], down_types[e], experts.gate_up.back().N / 2, c10::nullopt);
      TORCH_CHECK(experts.down.back().N == hidden_ && experts.gate_up.back().N == experts.gate_up.front().N,
                  "every expert must have the same shape, returning the hidden size");
    }
    TORCH_CHECK(shared_gate.has_value() == !shared_gate_up.is_none(), "a shared expert needs its gate");
    if (shared_gate.has_value()) {
      experts.shared_gate_up = PackedMatrix(shared_gate_up, shared_gate_up_types, hidden_, c10::nullopt);
      experts.shared_down = PackedMatrix(shared_down, shared_down_type, experts.shared_gate_up.N / 2, c10::nullopt);
      experts.shared_gate = shared_gate->contiguous();
      TORCH_CHECK(experts.shared_down.N == hidden_ && experts.shared_gate.dtype() == torch::kFloat32 &&
                      experts.shared_gate.numel() == hidden_,
                  "the shared expert must return the hidden size, its gate float32 [hidden]");
    }
  }

  void set_head(pybind11::object lm_head, pybind11::object ggml_type) {
    head_ = PackedMatrix(lm_head, ggml_type, hidden_, c10::nullopt);
  }

  // token_ids, positions [B]; block_tables [B][...] (each row's sequence's KV blocks, at
  // least up to its position's); logit_rows [R], the rows whose logits are wanted (a prompt's
  // inner tokens need none). Plain lists, not tensors: building four small tensors per step
  // cost more than the checks. Writes the B rows' keys and values; returns the logits [R, vocab].
  torch::Tensor run(const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                    const std::vector<std::vector<int32_t>>& block_tables, const std::vector<int64_t>& logit_rows) {
    const int64_t B = static_cast<int64_t>(ids.size()), R = static_cast<int64_t>(logit_rows.size());
    TORCH_CHECK(B >= 1 && B <= kMaxRows, "a planned decode step takes 1 to ", kMaxRows, " sequences");
    TORCH_CHECK(layers_.size() == static_cast<size_t>(kv_cache_.size(0)) && head_.N > 0, "the plan is incomplete");
    for (const Layer& L : layers_) TORCH_CHECK(L.gate_up.N > 0 || L.experts.defined(), "a layer has no MLP");
    TORCH_CHECK(pos.size() == ids.size() && block_tables.size() == ids.size(),
                "positions and block_tables must have one entry per token id");
    TORCH_CHECK(R <= B, "at most one logit row per row");
    int64_t width = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ids[b] >= 0 && ids[b] < embedding_.size(0), "token id out of range");
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_.size(0), "position out of range");
      TORCH_CHECK(pos[b] / block_size_ < static_cast<int64_t>(block_tables[b].size()), "block table too short for the position");
      width = std::max(width, pos[b] / block_size_ + 1);
    }
    tables_.assign(B * width, 0);   // each row's blocks up to the widest row's, padded with block 0 (never read)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j <= pos[b] / block_size_; ++j) {   // every block the row reads or writes
        const int32_t block = block_tables[b][j];
        TORCH_CHECK(block >= 0 && block * block_size_ < kv_cache_.size(2), "block id outside the KV cache");
        tables_[b * width + j] = block;
      }
    table_width_ = width;
    for (int64_t r = 0; r < R; ++r) TORCH_CHECK(logit_rows[r] >= 0 && logit_rows[r] < B, "logit row out of range");
    auto logits = torch::empty({R, head_.N}, torch::kFloat32);
    reserve(B);
    float* x = x_.data();
    for (int64_t b = 0; b < B; ++b) embed(ids[b], x + b * hidden_);
    if (embedding_scale_ != 1.f)
      for (int64_t i = 0; i < B * hidden_; ++i) x[i] *= embedding_scale_;
    for (size_t l = 0; l < layers_.size(); ++l) layer(l, B, pos.data());
    for (int64_t r = 0; r < R; ++r)
      rms_norm_rows(x + logit_rows[r] * hidden_, final_norm_.data_ptr<float>(), h_.data() + r * hidden_, 1, hidden_, eps_);
    if (R > 0) head_.apply(h_.data(), R, scratch_, logits.data_ptr<float>(), threads_);
    if (logit_divisor_ != 1.f) logits.div_(logit_divisor_);
    return logits;
  }

  // Granite's: each layer's two outputs scaled before they join the residual, the logits divided.
  void set_output_scales(double residual, double logit_divisor) {
    residual_scale_ = static_cast<float>(residual);
    logit_divisor_ = static_cast<float>(logit_divisor);
  }

 private:
  void reserve(int64_t B) {
    const Layer& first = layers_.front();
    x_.resize(B * hidden_);
    h_.resize(B * hidden_);
    qkv_.resize(B * first.qkv.N);
    attn_.resize(B * heads_ * head_dim_);
    out_.resize(B * hidden_);
  }

  void layer(size_t index, int64_t B, const int64_t* pos) {
    const Layer& L = layers_[index];
    float* x = x_.data();
    rms_norm_rows(x, L.input_norm.data_ptr<float>(), h_.data(), B, hidden_, eps_);
    L.qkv.apply(h_.data(), B, scratch_, qkv_.data(), threads_);
    (this->*write_and_attend_)(index, B, pos);
    L.o.apply(attn_.data(), B, scratch_, out_.data(), threads_);
    add_output(L.attention_out_norm, B);
    rms_norm_rows(x, L.post_norm.data_ptr<float>(), h_.data(), B, hidden_, eps_);
    if (L.experts.defined()) {
      layers_[index].experts.run(h_.data(), B, hidden_, out_.data(), scratch_, threads_);
    } else {
      gate_up_.resize(B * L.gate_up.N);
      act_.resize(B * L.gate_up.N / 2);
      L.gate_up.apply(h_.data(), B, scratch_, gate_up_.data(), threads_);
      const int64_t inner = L.gate_up.N / 2;
      for (int64_t b = 0; b < B; ++b) activation_(gate_up_.data() + b * 2 * inner, inner, act_.data() + b * inner);
      L.down.apply(act_.data(), B, scratch_, out_.data(), threads_);
    }
    add_output(L.mlp_out_norm, B);
  }

  // x += out (the attention's or the MLP's B rows), normalised first where `norm` is defined.
  void add_output(const torch::Tensor& norm, int64_t B) {
    if (norm.defined()) rms_norm_rows(out_.data(), norm.data_ptr<float>(), out_.data(), B, hidden_, eps_);
    float* x = x_.data();
    if (residual_scale_ != 1.f)   // scaled and stored first (no fused multiply-add): the eager rounding
      for (int64_t i = 0; i < B * hidden_; ++i) out_[i] *= residual_scale_;
    for (int64_t i = 0; i < B * hidden_; ++i) x[i] += out_[i];
  }

  int64_t cache_row(int64_t b, int64_t position) const {
    const int32_t* table = tables_.data() + b * table_width_;
    return static_cast<int64_t>(table[position / block_size_]) * block_size_ + position % block_size_;
  }

  using WriteAndAttend = void (DecodePlan::*)(size_t, int64_t, const int64_t*);

  // The cache's element type, chosen once: the step's writes and attention are compiled for it.
  static WriteAndAttend write_and_attend_for(const torch::Tensor& kv_cache) {
    switch (kv_cache.scalar_type()) {
      case torch::kFloat32: return &DecodePlan::write_and_attend<float>;
      case torch::kFloat16: return &DecodePlan::write_and_attend<c10::Half>;
      case torch::kBFloat16: return &DecodePlan::write_and_attend<c10::BFloat16>;
      default: TORCH_CHECK(false, "the KV cache must be float32, float16 or bfloat16, got ", kv_cache.scalar_type());
    }
  }

  // QK-norm (where the layer has it) and RoPE on the new q and k, k and v into the cache (T:
  // its element type), then attention over each sequence's keys.
  template <typename T>
  void write_and_attend(size_t index, int64_t B, const int64_t* pos) {
    const Layer& L = layers_[index];
    const int64_t D = head_dim_, width = (heads_ + 2 * kv_heads_) * D, rows = kv_cache_.size(2);
    T* k_cache = static_cast<T*>(kv_cache_.data_ptr()) + index * 2 * rows * kv_heads_ * D;
    T* v_cache = k_cache + rows * kv_heads_ * D;
    for (int64_t b = 0; b < B; ++b) {
      float* q = qkv_.data() + b * width;
      const float* c = L.cos.data_ptr<float>() + pos[b] * D;
      const float* s = L.sin.data_ptr<float>() + pos[b] * D;
      if (L.full_qk_norm) {   // q and k each normalised whole (OLMoE), before the clip: the eager order
        rms_norm_rows(q, L.q_norm.data_ptr<float>(), q, 1, heads_ * D, eps_);
        rms_norm_rows(q + heads_ * D, L.k_norm.data_ptr<float>(), q + heads_ * D, 1, kv_heads_ * D, eps_);
      }
      if (L.clip > 0)
        for (int64_t i = 0; i < width; ++i) q[i] = std::min(std::max(q[i], -L.clip), L.clip);
      if (L.q_norm.defined() && !L.full_qk_norm) {   // each head of q, then of k
        rms_norm_rows(q, L.q_norm.data_ptr<float>(), q, heads_, D, eps_);
        rms_norm_rows(q + heads_ * D, L.k_norm.data_ptr<float>(), q + heads_ * D, kv_heads_, D, eps_);
      }
      rope_heads(q, heads_ + kv_heads_, D, c, s);  // q's heads, then k's, are consecutive
      const int64_t row = cache_row(b, pos[b]);
      store_row(q + heads_ * D, kv_heads_ * D, k_cache + row * kv_heads_ * D);
      store_row(q + (heads_ + kv_heads_) * D, kv_heads_ * D, v_cache + row * kv_heads_ * D);
    }
    attention_.run<T>(qkv_.data(), width, B, pos, tables_.data(), table_width_, k_cache, v_cache,
                      attn_.data(), threads_, L.scale, L.window);
  }

  WorkerPool threads_;   // first: started before, and stopped after, everything that uses it
  int64_t heads_, kv_heads_, head_dim_, hidden_ = 0;
  float eps_, embedding_scale_, residual_scale_ = 1.f, logit_divisor_ = 1.f;
  GatedActivation activation_;
  // token id's row of the embedding, fp32, into x [hidden]
  void embed(int64_t id, float* x) const {
    if (embedding_type_ == 0) {
      std::memcpy(x, embedding_.data_ptr<float>() + id * hidden_, hidden_ * sizeof(float));
      return;
    }
    const int64_t row_bytes = embedding_.size(1);
    const uint8_t* row = embedding_.data_ptr<uint8_t>() + id * row_bytes;
    with_type(embedding_type_, [&](auto type) { dequantize_rows<decltype(type)::value>(row, x, hidden_, row_bytes, 0, 1); });
  }

  torch::Tensor embedding_;
  int64_t embedding_type_ = 0;
  torch::Tensor cos_, sin_, final_norm_, kv_cache_;
  int64_t block_size_;
  std::vector<Layer> layers_;
  PackedMatrix head_;
  DecodeAttention attention_;
  WriteAndAttend write_and_attend_;
  std::vector<float> x_, h_, qkv_, attn_, gate_up_, act_, out_;
  std::vector<int32_t> tables_;   // this step's block tables, [B, table_width_]
  int64_t table_width_ = 0;
  Activations scratch_;
};

}  // namespace

void register_decode_plan(pybind11::module& m) {
  namespace py = pybind11;
#if HAYATE_INTERLEAVED   // only where the CPU has AVX-512 VNNI
  py::class_<InterleavedWeight>(m, "InterleavedWeight", "a GGUF weight rearranged for the VNNI kernel")
      .def(py::init([](const torch::Tensor& w, int64_t ggml_type, int64_t K) { return InterleavedWeight(w, ggml_type, K); }),
           py::arg("w"), py::arg("ggml_type"), py::arg("K"))
      .def_static("all", &InterleavedWeight::all, py::arg("ws"), py::arg("ggml_types"), py::arg("Ks"),
                  "weights rearranged into one arena of 2 MB pages")
      .def("apply", &InterleavedWeight::apply, py::call_guard<py::gil_scoped_release>())
      .def("dequantize", &InterleavedWeight::dequantize, py::arg("out") = py::none(),
           py::call_guard<py::gil_scoped_release>())
      .def("gguf_blocks", [](const InterleavedWeight& w) { return w.matrix.gguf_blocks(); })
      .def("nbytes", [](const InterleavedWeight& w) { return w.matrix.nbytes(); });
#endif
  py::class_<DecodePlan>(m, "DecodePlan", "a Llama-family decode step, planned once, run as one call")
      .def(py::init<int64_t, int64_t, int64_t, double, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                    torch::Tensor, int64_t, int64_t, int64_t, double, bool>(),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("embedding"),
           py::arg("cos"), py::arg("sin"), py::arg("final_norm"), py::arg("kv_cache"), py::arg("block_size"),
           py::arg("threads"), py::arg("embedding_type") = 0, py::arg("embedding_scale") = 1.0, py::arg("gelu") = false)
      .def("add_layer", &DecodePlan::add_layer, py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"),
           py::arg("qkv_type"), py::arg("qkv_bias"), py::arg("o"), py::arg("o_type"), py::arg("o_bias"),
           py::arg("gate_up"), py::arg("gate_up_type"), py::arg("gate_up_bias"), py::arg("down"),
           py::arg("down_type"), py::arg("down_bias"), py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(),
           py::arg("attention_out_norm") = py::none(), py::arg("mlp_out_norm") = py::none(), py::arg("scale") = 0.0,
           py::arg("window") = 0, py::arg("cos") = py::none(), py::arg("sin") = py::none(), py::arg("clip") = 0.0)
      .def("add_experts", &DecodePlan::add_experts, py::arg("router"), py::arg("top_k"), py::arg("normalize"),
           py::arg("gate_up"), py::arg("gate_up_types"), py::arg("down"), py::arg("down_types"),
           py::arg("shared_gate_up") = py::none(), py::arg("shared_gate_up_types") = py::none(),
           py::arg("shared_down") = py::none(), py::arg("shared_down_type") = py::none(),
           py::arg("shared_gate") = py::none())
      .def("set_head", &DecodePlan::set_head)
      .def("set_output_scales", &DecodePlan::set_output_scales, py::arg("residual"), py::arg("logit_divisor"))
      .def("run", &DecodePlan::run, py::call_guard<py::gil_scoped_release>());
}
