// Scaled dot-product attention through oneDNN matmuls, as an XLA FFI custom call for the CPU (sdjax/onednn.py
// builds and registers it beside the convolutions). Why: XLA:CPU computes SD's attention as batched dots with a
// contraction of only 40-160 (head_dim) over float32 scores, at a fifth of the FLOP rate its convolutions and
// dense layers reach (bf16 UNet at 512x512 on 2 cores: attention 1.8 of 3.7 s for 15% of the FLOPs), while
// oneDNN's brgemm matmuls run bf16 at the hardware's rate.
//
// q [B, Lq, H, D], k and v [B, Lk, H, D], o [B, Lq, H, D], all of one type (bf16 or f32), read and written in
// place through strides. For each (batch, head), on its own OpenMP thread: k^T and v are reordered once into
// the matmul's blocked layout; then per block of QUERY_BLOCK queries, S = q k^T in float32 (f32 accumulation),
// a float32 softmax of S / sqrt(D) per row, P rounded once to the input type, and o = P v with f32
// accumulation, rounded once into o. That is the plain form's arithmetic (sdjax.layers._attention_xla), in
// another summation order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "onednn_common.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using sdjax_onednn::Engine;
using sdjax_onednn::OnednnType;

namespace {

#ifndef SDJAX_QUERY_BLOCK
#define SDJAX_QUERY_BLOCK 64
#endif
// Rows of scores per step: 64 x 4096 float32 = 1 MiB, in the L2 (128 and 32 measured slower on 2-core EPYC).
constexpr int64_t QUERY_BLOCK = SDJAX_QUERY_BLOCK;

// One plan per (type, Lq, Lk, H, D).
struct Plan {
  dnnl::matmul scores, values;  // S = Q K^T, O = P V (rows = one query block)
  dnnl::matmul scores_tail, values_tail;  // the same for the last, shorter block (when Lq % QUERY_BLOCK)
  memory::desc kt_user, kt_blocked, v_user, v_blocked;
  memory::desc q_md, s_md, p_md, o_md, q_tail, s_tail, p_tail, o_tail;
  size_t scratch_bytes;
  bool reorder_k, reorder_v;
};

sdjax_onednn::PlanCache<Plan>& Plans() {
  static auto* plans = new sdjax_onednn::PlanCache<Plan>();
  return *plans;
}

template <ffi::DataType T>
std::unique_ptr<Plan> MakePlan(int64_t lq, int64_t lk, int64_t h, int64_t d) {
  constexpr auto dt = OnednnType<T>();
  const auto f32 = memory::data_type::f32;
  const int64_t row = h * d;  // stride between tokens in q, k, v and o
  auto plan = std::make_unique<Plan>();
  // K^T [D, Lk] and V [Lk, D] as strided views of one (batch, head) of k and v; "any": the kernel's layout.
  plan->kt_user = memory::desc({d, lk}, dt, memory::dims{1, row});
  plan->v_user = memory::desc({lk, d}, dt, memory::dims{row, 1});
  memory::desc kt_any({d, lk}, dt, memory::format_tag::any), v_any({lk, d}, dt, memory::format_tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per thread: shards and heads run concurrently
  size_t scratch = 0;
  auto make = [&](int64_t rows, memory::desc& q, memory::desc& s, memory::desc& p, memory::desc& o,
                  dnnl::matmul& scores, dnnl::matmul& values, bool first) {
    q = memory::desc({rows, d}, dt, memory::dims{row, 1});
    s = memory::desc({rows, lk}, f32, memory::format_tag::ab);
    p = memory::desc({rows, lk}, dt, memory::format_tag::ab);
    o = memory::desc({rows, d}, dt, memory::dims{row, 1});
    dnnl::matmul::primitive_desc spd(Engine(), q, first ? kt_any : plan->kt_blocked, s, attr);
    dnnl::matmul::primitive_desc vpd(Engine(), p, first ? v_any : plan->v_blocked, o, attr);
    if (first) {
      plan->kt_blocked = spd.weights_desc();
      plan->v_blocked = vpd.weights_desc();
    }
    scratch = std::max({scratch, spd.scratchpad_desc().get_size(), vpd.scratchpad_desc().get_size()});
    scores = dnnl::matmul(spd);
    values = dnnl::matmul(vpd);
  };
  const int64_t rows = std::min(lq, QUERY_BLOCK), tail = lq % rows;
  make(rows, plan->q_md, plan->s_md, plan->p_md, plan->o_md, plan->scores, plan->values, true);
  if (tail) {
    make(tail, plan->q_tail, plan->s_tail, plan->p_tail, plan->o_tail, plan->scores_tail, plan->values_tail,
         false);
  }
  plan->scratch_bytes = scratch;
  plan->reorder_k = plan->kt_blocked != plan->kt_user;
  plan->reorder_v = plan->v_blocked != plan->v_user;
  return plan;
}

// e^x for x <= 0 (scores minus their row's max), to ~2 float32 ulp: x = n ln2 + r, |r| <= ln2/2, a degree-6
// Taylor polynomial for e^r, 2^n from the exponent bits. Written out so the row loop vectorises (no libm call).
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);  // e^-87 ~ 1.6e-38: the smallest normal float
  // round to nearest by the 1.5 * 2^23 trick (vectorises where nearbyint may not)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split: hi exact, lo the rest
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline uint16_t RoundToBF16(float x) {  // round to nearest even (no NaN here: probabilities)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// One row of scores s [n] (float32, overwritten) -> probabilities p [n] of the input type: softmax(s * scale).
template <ffi::DataType T>
void SoftmaxRow(float* s, void* p, int64_t n, float scale) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  m *= scale;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = ExpNonPositive(s[j] * scale - m);
    sum += s[j];
  }
  const float inv = 1.0f / sum;
  if constexpr (T == ffi::DataType::BF16) {
    auto* out = static_cast<uint16_t*>(p);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = RoundToBF16(s[j] * inv);
  } else {
    auto* out = static_cast<float*>(p);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = s[j] * inv;
  }
}

template <ffi::DataType T>
ffi::Error Attention(ffi::Buffer<T> q, ffi::Buffer<T> k, ffi::Buffer<T> v, ffi::ResultBuffer<T> o) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = o->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("sdjax_onednn_attention: operands must be 4-D [B, L, H, D]");
  }
  const int64_t b = qd[0], lq = qd[1], h = qd[2], d = qd[3], lk = kd[1];
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i] || qd[i] != od[i] || (i != 1 && kd[i] != qd[i])) {
      return ffi::Error::InvalidArgument("sdjax_onednn_attention: expects q, o [B, Lq, H, D], k, v [B, Lk, H, D]");
    }
  }
  if (b == 0 || lq == 0 || h == 0) return ffi::Error::Success();
  if (lk == 0 || d == 0) return ffi::Error::InvalidArgument("sdjax_onednn_attention: no keys or empty heads");
  constexpr size_t item = T == ffi::DataType::BF16 ? 2 : 4;
  try {
    Plan* plan = Plans().Get({static_cast<int64_t>(T), lq, lk, h, d}, [&] { return MakePlan<T>(lq, lk, h, d); });
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    auto* qp = static_cast<char*>(q.untyped_data());
    auto* kp = static_cast<char*>(k.untyped_data());
    auto* vp = static_cast<char*>(v.untyped_data());
    auto* op = static_cast<char*>(o->untyped_data());
    const int64_t rows = std::min(lq, QUERY_BLOCK);
    std::string error;
#pragma omp parallel
    {
      try {
        dnnl::stream stream(Engine());
        memory kt_blocked(plan->kt_blocked, Engine()), v_blocked(plan->v_blocked, Engine());
        memory scores(plan->s_md, Engine()), probs(plan->p_md, Engine());
        memory scratch(memory::desc({std::max<int64_t>(1, plan->scratch_bytes)}, memory::data_type::u8,
                                    memory::format_tag::a),
                       Engine());
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < b * h; ++task) {
          const int64_t bi = task / h, hi = task % h;
          const int64_t head = (hi * d) * item;  // byte offset of this head in a token's row
          memory kt_user(plan->kt_user, Engine(), kp + bi * lk * h * d * item + head);
          memory v_user(plan->v_user, Engine(), vp + bi * lk * h * d * item + head);
          memory kt = kt_user, vv = v_user;
          if (plan->reorder_k) {
            dnnl::reorder(kt_user, kt_blocked).execute(stream, kt_user, kt_blocked);
            kt = kt_blocked;
          }
          if (plan->reorder_v) {
            dnnl::reorder(v_user, v_blocked).execute(stream, v_user, v_blocked);
            vv = v_blocked;
          }
          for (int64_t q0 = 0; q0 < lq; q0 += rows) {
            const bool tail = q0 + rows > lq;
            const int64_t n = tail ? lq - q0 : rows;
            const int64_t at = (bi * lq + q0) * h * d * item + head;
            memory qm(tail ? plan->q_tail : plan->q_md, Engine(), qp + at);
            memory om(tail ? plan->o_tail : plan->o_md, Engine(), op + at);
            memory sm(tail ? plan->s_tail : plan->s_md, Engine(), scores.get_data_handle());
            memory pm(tail ? plan->p_tail : plan->p_md, Engine(), probs.get_data_handle());
            (tail ? plan->scores_tail : plan->scores)
                .execute(stream, {{DNNL_ARG_SRC, qm}, {DNNL_ARG_WEIGHTS, kt}, {DNNL_ARG_DST, sm},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
            stream.wait();
            auto* s = static_cast<float*>(scores.get_data_handle());
            auto* p = static_cast<char*>(probs.get_data_handle());
            for (int64_t i = 0; i < n; ++i) SoftmaxRow<T>(s + i * lk, p + i * lk * item, lk, scale);
            (tail ? plan->values_tail : plan->values)
                .execute(stream, {{DNNL_ARG_SRC, pm}, {DNNL_ARG_WEIGHTS, vv}, {DNNL_ARG_DST, om},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
            stream.wait();
          }
        }
      } catch (const std::exception& e) {
#pragma omp critical
        error = e.what();
      }
    }
    if (!error.empty()) {
      return ffi::Error::Internal(std::string("sdjax_onednn_attention: oneDNN failed: ") + error);
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("sdjax_onednn_attention: oneDNN failed: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define SDJAX_ATTENTION_HANDLER(name, type)                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (Attention<type>),                            \
                                ffi::Ffi::Bind()                                    \
                                    .Arg<ffi::Buffer<type>>()                       \
                                    .Arg<ffi::Buffer<type>>()                       \
                                    .Arg<ffi::Buffer<type>>()                       \
                                    .Ret<ffi::Buffer<type>>());

SDJAX_ATTENTION_HANDLER(SdjaxOnednnAttentionBF16, ffi::DataType::BF16)
SDJAX_ATTENTION_HANDLER(SdjaxOnednnAttentionF32, ffi::DataType::F32)
