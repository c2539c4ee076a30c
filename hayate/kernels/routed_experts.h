// A mixture of experts' MLP in the planned step (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the router in
// fp32, a softmax and the top_k of each row (renormalised or not), the rows grouped by expert
// (experts ascending; within one, slot by slot, rows ascending: the eager block's order), each
// touched expert's gate/up and down over its rows on the plan's threads, and their outputs
// added back weighted in that same order (the eager block's index_add_); then, where there is
// one, the shared expert's output over every row, weighted by sigmoid(shared_gate . h).
#pragma once
#include "activations.h"
#include "packed_matrix.h"

namespace {

struct RoutedExperts {
  torch::Tensor router;                     // float32 [experts, hidden]
  std::vector<PackedMatrix> gate_up, down;  // per expert: gate and up side by side; down
  int64_t top_k = 0;
  bool normalize = true;
  PackedMatrix shared_gate_up, shared_down;   // Qwen2-MoE's shared expert, or empty
  torch::Tensor shared_gate;                  // float32 [hidden], with it

  bool defined() const { return !gate_up.empty(); }

  // out [B, hidden] = the block over h [B, hidden] (each row a token)
  void run(const float* h, int64_t B, int64_t hidden, float* out, Activations& scratch, WorkerPool& threads) {
    route(h, B, hidden);
    group_rows(B);
    const int64_t n = static_cast<int64_t>(order_.size()), inner = gate_up.front().N / 2;
    hs_.resize(n * 2 * inner);
    acts_.resize(n * inner);
    ys_.resize(n * hidden);
#if HAYATE_INTERLEAVED
    const bool grouped = !gate_up.front().bias.defined() && !down.front().bias.defined();
#else
    const bool grouped = false;
#endif
    if (B > 1 || !grouped) {   // each expert's rows gathered (one row: every expert reads h itself)
      xs_.resize(n * hidden);
      for (int64_t i = 0; i < n; ++i) std::copy_n(h + order_[i] / top_k * hidden, hidden, xs_.data() + i * hidden);
    }
#if HAYATE_INTERLEAVED
    if (grouped) project_grouped(h, B, hidden, inner, threads);
#endif
    if (!grouped) project_each(hidden, inner, scratch, threads);
    std::fill(out, out + B * hidden, 0.f);
    for (int64_t i = 0; i < n; ++i) {   // experts ascending, each's rows in order: index_add_'s order
      float* row = out + order_[i] / top_k * hidden;
      const float weight = weights_[order_[i]];
      for (int64_t j = 0; j < hidden; ++j) row[j] += ys_[i * hidden + j] * weight;
    }
    if (shared_gate_up.N > 0) add_shared(h, B, hidden, out, scratch, threads);
  }

 private:
  // order_: the rows (b * top_k + slot) routed to each expert, experts ascending and, within
  // one, slot by slot, rows ascending (the eager block's order); first_[e]: expert e's first.
  void group_rows(int64_t B) {
    const int64_t experts = router.size(0);
    first_.assign(1, 0);
    order_.clear();
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t slot = 0; slot < top_k; ++slot)
        for (int64_t b = 0; b < B; ++b)
          if (chosen_[b * top_k + slot] == e) order_.push_back(b * top_k + slot);
      first_.push_back(static_cast<int64_t>(order_.size()));
    }
  }

  // Each touched expert's gate/up, then down, over its rows: two parallel sections an expert.
  void project_each(int64_t hidden, int64_t inner, Activations& scratch, WorkerPool& threads) {
    for (int64_t e = 0; e + 1 < static_cast<int64_t>(first_.size()); ++e) {
      const int64_t at = first_[e], rows = first_[e + 1] - at;
      if (rows == 0) continue;
      gate_up[e].apply(xs_.data() + at * hidden, rows, scratch, hs_.data() + at * 2 * inner, threads);
      for (int64_t i = at; i < at + rows; ++i) silu_mul(hs_.data() + i * 2 * inner, inner, acts_.data() + i * inner);
      down[e].apply(acts_.data() + at * inner, rows, scratch, ys_.data() + at * hidden, threads);
    }
  }

#if HAYATE_INTERLEAVED
  // Every touched expert's gate and up over its rows in one parallel section, then every down
  // in one more; each expert's rows computed as project_each computes them.
  void project_grouped(const float* h, int64_t B, int64_t hidden, int64_t inner, WorkerPool& threads) {
    const int64_t experts = static_cast<int64_t>(first_.size()) - 1, n = first_.back();
    inputs_.clear();
    parts_.clear();
    if (B == 1) inputs_.push_back({h, 1, hidden});   // one row: every expert's input, quantized once
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t rows = first_[e + 1] - first_[e];
      if (rows == 0) continue;
      if (B > 1) inputs_.push_back({xs_.data() + first_[e] * hidden, rows, hidden});
      float* into = hs_.data() + first_[e] * 2 * inner;
      for (const InterleavedMatrix& w : gate_up[e].parts) {
        parts_.push_back({inputs_.size() - 1, &w, into, 2 * inner});
        into += w.N();
      }
    }
    interleaved_gemv_parts(inputs_, parts_, planes_, threads);
    for (int64_t i = 0; i < n; ++i) silu_mul(hs_.data() + i * 2 * inner, inner, acts_.data() + i * inner);
    inputs_.clear();
    parts_.clear();
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t rows = first_[e + 1] - first_[e];
      if (rows == 0) continue;
      TORCH_CHECK(down[e].parts.size() == 1, "an expert's down projection is one matrix");
      inputs_.push_back({acts_.data() + first_[e] * inner, rows, inner});
      parts_.push_back({inputs_.size() - 1, &down[e].parts.front(), ys_.data() + first_[e] * hidden, hidden});
    }
    interleaved_gemv_parts(inputs_, parts_, planes_, threads);
  }

  std::vector<GemvInput> inputs_;
  std::vector<GemvPart> parts_;
  std::vector<ActivationPlanes> planes_;
#endif

  void add_shared(const float* h, int64_t B, int64_t hidden, float* out, Activations& scratch, WorkerPool& threads) {
    const int64_t inner = shared_gate_up.N / 2;
    hs_.resize(B * 2 * inner);
    acts_.resize(B * inner);
    ys_.resize(B * hidden);
    shared_gate_up.apply(h, B, scratch, hs_.data(), threads);
    for (int64_t b = 0; b < B; ++b) silu_mul(hs_.data() + b * 2 * inner, inner, acts_.data() + b * inner);
    shared_down.apply(acts_.data(), B, scratch, ys_.data(), threads);
    const float* g = shared_gate.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float dot = 0.f;
      for (int64_t j = 0; j < hidden; ++j) dot += h[b * hidden + j] * g[j];
      const float weight = 1.f / (1.f + std::exp(-dot));
      for (int64_t j = 0; j < hidden; ++j) out[b * hidden + j] += weight * ys_[b * hidden + j];
    }
  }

  // Each row's top_k experts (chosen_) and their weights (weights_), [B][top_k], largest first.
  void route(const float* h, int64_t B, int64_t hidden) {
    const int64_t experts = router.size(0);
    const float* r = router.data_ptr<float>();
    chosen_.resize(B * top_k);
    weights_.resize(B * top_k);
    probabilities_.resize(experts);
    for (int64_t b = 0; b < B; ++b) {
      float largest = -INFINITY;
      for (int64_t e = 0; e < experts; ++e) {
        float dot = 0.f;
        for (int64_t j = 0; j < hidden; ++j) dot += h[b * hidden + j] * r[e * hidden + j];
        probabilities_[e] = dot;
        largest = std::max(largest, dot);
      }
      float total = 0.f;
      for (int64_t e = 0; e < experts; ++e) total += (probabilities_[e] = std::exp(probabilities_[e] - largest));
      for (int64_t e = 0; e < experts; ++e) probabilities_[e] /= total;
      float kept = 0.f;
      taken_.assign(experts, 0);
      for (int64_t slot = 0; slot < top_k; ++slot) {   // the largest left (NaN above all, as topk), lowest on a tie
        int64_t best = -1;
        for (int64_t e = 0; e < experts; ++e) {
          if (taken_[e]) continue;
          const float p = probabilities_[e];
          if (best < 0 || (std::isnan(p) && !std::isnan(probabilities_[best])) || p > probabilities_[best]) best = e;
        }
        taken_[best] = 1;
        chosen_[b * top_k + slot] = best;
        weights_[b * top_k + slot] = probabilities_[best];
        kept += probabilities_[best];
      }
      if (normalize)
        for (int64_t slot = 0; slot < top_k; ++slot) weights_[b * top_k + slot] /= kept;
    }
  }

  std::vector<int64_t> chosen_, order_, first_;
  std::vector<uint8_t> taken_;
  std::vector<float> weights_, probabilities_, xs_, hs_, acts_, ys_;
};

}  // namespace
