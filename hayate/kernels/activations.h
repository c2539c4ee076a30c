// The gated MLPs' activations, over one row's gate and up halves: SwiGLU (Llama, Qwen, the
// experts) and GeGLU with tanh's GELU (Gemma), both as x / (1 + e^-z) on the vector exp.
#pragma once
#include "decode_attention.h"

namespace {

// act = silu(gate) * up, gate and up the two halves of gate_up [2 * inner]
inline void silu_mul(const float* gate_up, int64_t inner, float* act) {
  for (int64_t i = 0; i < inner; ++i) act[i] = -gate_up[i];
  exp_in_place(act, inner);   // e^-g
  for (int64_t i = 0; i < inner; ++i) act[i] = gate_up[i] / (1.f + act[i]) * gate_up[inner + i];
}

// act = gelu_tanh(gate) * up: 0.5 g (1 + tanh(y)) with y = sqrt(2 / pi) (g + 0.044715 g^3),
// which is g / (1 + e^-2y).
inline void gelu_tanh_mul(const float* gate_up, int64_t inner, float* act) {
  constexpr float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  for (int64_t i = 0; i < inner; ++i) {
    const float g = gate_up[i];
    act[i] = -2.f * kBeta * (g + kKappa * g * g * g);
  }
  exp_in_place(act, inner);   // e^-2y
  for (int64_t i = 0; i < inner; ++i) act[i] = gate_up[i] / (1.f + act[i]) * gate_up[inner + i];
}

// The one a plan runs, chosen once: gate_up [2 * inner] -> act [inner].
using GatedActivation = void (*)(const float*, int64_t, float*);

inline GatedActivation gated_activation(bool gelu) { return gelu ? &gelu_tanh_mul : &silu_mul; }

}  // namespace
