// 2-D convolution through oneDNN, as XLA FFI custom calls for the CPU (sdjax/onednn.py builds and registers
// them). Why: XLA:CPU (jax 0.10) runs bfloat16 convolutions by converting to float32, at float32 speed,
// while oneDNN has AVX512-BF16/AMX kernels; its float32 kernels are faster than XLA's too.
//
// x: [N, H, W, C] (NHWC), w: [KH, KW, C, O] (HWIO, as flax stores it), b: [O] (the forward-with-bias kernels),
// y: [N, OH, OW, O]. Accumulation in float32 whatever the input type, the bias added to the accumulator, one
// rounding to the output type (what torch's oneDNN path does). The bias is the kernel's own: added by XLA
// afterwards it was a separate pass that XLA also duplicated into each consumer of the result (two extra 256 MiB
// copies after the fp32 VAE decoder's last upsampler, which set the decode's peak memory). The backward-data
// kernel (dy, w -> dx) serves gradients through the input (LoRA training). The weights are reordered into
// oneDNN's blocked layout on every call (they are call arguments, not constants).
#include <cstdint>
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

// One plan per (direction, type, shapes, strides, padding).
struct Plan {
  dnnl::primitive primitive;
  memory::desc in, out, weights, user_weights, bias, scratchpad;  // in/out: x/y forward, dy/dx backward
  bool reorder_weights;
};

sdjax_onednn::PlanCache<Plan>& Plans() {
  static auto* plans = new sdjax_onednn::PlanCache<Plan>();
  return *plans;
}

// x [N,H,W,C], w [KH,KW,C,O], y [N,OH,OW,O]: the forward primitive, or (backward) the one computing dx from dy.
template <ffi::DataType T>
std::unique_ptr<Plan> MakePlan(bool backward, bool with_bias, const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                               const std::vector<int64_t>& y, memory::dims strides, memory::dims pad_lo,
                               memory::dims pad_hi) {
  constexpr auto dt = OnednnType<T>();
  memory::dims wdims = {w[3], w[2], w[0], w[1]};  // oneDNN's logical order: O, I, KH, KW
  memory::desc src({x[0], x[3], x[1], x[2]}, dt, memory::format_tag::nhwc);
  memory::desc dst({y[0], y[3], y[1], y[2]}, dt, memory::format_tag::nhwc);
  memory::desc user_weights(wdims, dt, memory::format_tag::hwio);
  memory::desc any_weights(wdims, dt, memory::format_tag::any);  // the kernel's preferred (blocked) layout
  // Scratch space is allocated per call (user mode): XLA runs the shards of a multi-device CPU program
  // concurrently, and a library-managed scratchpad is shared between executions (wrong results, measured).
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto prop = backward ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference;
  memory::desc bias({w[3]}, dt, memory::format_tag::a);
  auto fwd = with_bias ? dnnl::convolution_forward::primitive_desc(Engine(), prop, dnnl::algorithm::convolution_direct,
                                                                   src, any_weights, bias, dst, strides, pad_lo,
                                                                   pad_hi, attr)
                       : dnnl::convolution_forward::primitive_desc(Engine(), prop, dnnl::algorithm::convolution_direct,
                                                                   src, any_weights, dst, strides, pad_lo, pad_hi,
                                                                   attr);
  if (!backward) {
    return std::unique_ptr<Plan>(new Plan{dnnl::convolution_forward(fwd), fwd.src_desc(), fwd.dst_desc(),
                                          fwd.weights_desc(), user_weights, bias, fwd.scratchpad_desc(),
                                          fwd.weights_desc() != user_weights});
  }
  dnnl::convolution_backward_data::primitive_desc bwd(Engine(), dnnl::algorithm::convolution_direct, src,
                                                      any_weights, dst, strides, pad_lo, pad_hi, fwd, attr);
  return std::unique_ptr<Plan>(new Plan{dnnl::convolution_backward_data(bwd), bwd.diff_dst_desc(),
                                        bwd.diff_src_desc(), bwd.weights_desc(), user_weights, bias,
                                        bwd.scratchpad_desc(), bwd.weights_desc() != user_weights});
}

// Forward: in = x, out = y (plus `bias` when not null). Backward (data): in = dy, out = dx; the shapes are always
// named as the forward's.
template <ffi::DataType T, bool Backward>
ffi::Error Run(ffi::Buffer<T> in, ffi::Buffer<T> w, const ffi::Buffer<T>* bias, ffi::ResultBuffer<T> out,
               int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
               int64_t pad_right) {
  auto id = in.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (id.size() != 4 || wd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("sdjax_onednn_conv: operands must be 4-D (NHWC, HWIO)");
  }
  std::vector<int64_t> x(id.begin(), id.end()), y(od.begin(), od.end());
  if (Backward) std::swap(x, y);
  std::vector<int64_t> wv(wd.begin(), wd.end());
  if (wv[2] != x[3] || y[0] != x[0] || y[3] != wv[3]) {
    return ffi::Error::InvalidArgument("sdjax_onednn_conv: expects x [N,H,W,C], w [KH,KW,C,O], y [N,OH,OW,O]");
  }
  if (bias != nullptr && (bias->dimensions().size() != 1 || bias->dimensions()[0] != wv[3])) {
    return ffi::Error::InvalidArgument("sdjax_onednn_conv: expects the bias [O]");
  }
  const bool with_bias = bias != nullptr;
  try {
    std::vector<int64_t> key = {Backward, with_bias, static_cast<int64_t>(T), x[0], x[1], x[2], x[3], wv[0], wv[1],
                                wv[3], y[1], y[2], stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
    Plan* plan = Plans().Get(key, [&] {
      return MakePlan<T>(Backward, with_bias, x, wv, y, {stride_h, stride_w}, {pad_top, pad_left}, {pad_bottom, pad_right});
    });
    dnnl::stream stream(Engine());
    memory in_mem(plan->in, Engine(), in.untyped_data());
    memory out_mem(plan->out, Engine(), out->untyped_data());
    memory weights(plan->user_weights, Engine(), w.untyped_data());
    if (plan->reorder_weights) {
      memory blocked(plan->weights, Engine());
      dnnl::reorder(weights, blocked).execute(stream, weights, blocked);
      weights = blocked;
    }
    memory scratchpad(plan->scratchpad, Engine());
    if (Backward) {
      plan->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, in_mem}, {DNNL_ARG_WEIGHTS, weights},
                                       {DNNL_ARG_DIFF_SRC, out_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (with_bias) {
      memory bias_mem(plan->bias, Engine(), bias->untyped_data());
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, in_mem}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, bias_mem},
                                       {DNNL_ARG_DST, out_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, in_mem}, {DNNL_ARG_WEIGHTS, weights},
                                       {DNNL_ARG_DST, out_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    }
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("sdjax_onednn_conv: oneDNN failed: ") + e.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType T, bool Backward>
ffi::Error Conv(ffi::Buffer<T> in, ffi::Buffer<T> w, ffi::ResultBuffer<T> out, int64_t stride_h, int64_t stride_w,
                int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Run<T, Backward>(in, w, nullptr, out, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
}

template <ffi::DataType T>
ffi::Error ConvBias(ffi::Buffer<T> in, ffi::Buffer<T> w, ffi::Buffer<T> bias, ffi::ResultBuffer<T> out,
                    int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                    int64_t pad_right) {
  return Run<T, false>(in, w, &bias, out, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
}

}  // namespace

// Every convolution handler's attributes (stride and padding), after its buffers.
#define SDJAX_CONV_ATTRS                                                                      \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

#define SDJAX_CONV_HANDLER(name, type, backward)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (Conv<type, backward>),                                  \
                                ffi::Ffi::Bind()                                               \
                                    .Arg<ffi::Buffer<type>>()                                  \
                                    .Arg<ffi::Buffer<type>>()                                  \
                                    .Ret<ffi::Buffer<type>>() SDJAX_CONV_ATTRS);

#define SDJAX_CONV_BIAS_HANDLER(name, type)                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (ConvBias<type>),                                        \
                                ffi::Ffi::Bind()                                               \
                                    .Arg<ffi::Buffer<type>>()                                  \
                                    .Arg<ffi::Buffer<type>>()                                  \
                                    .Arg<ffi::Buffer<type>>()                                  \
                                    .Ret<ffi::Buffer<type>>() SDJAX_CONV_ATTRS);

SDJAX_CONV_HANDLER(SdjaxOnednnConvBF16, ffi::DataType::BF16, false)
SDJAX_CONV_HANDLER(SdjaxOnednnConvF32, ffi::DataType::F32, false)
SDJAX_CONV_HANDLER(SdjaxOnednnConvBackwardDataBF16, ffi::DataType::BF16, true)
SDJAX_CONV_HANDLER(SdjaxOnednnConvBackwardDataF32, ffi::DataType::F32, true)
SDJAX_CONV_BIAS_HANDLER(SdjaxOnednnConvBiasBF16, ffi::DataType::BF16)
SDJAX_CONV_BIAS_HANDLER(SdjaxOnednnConvBiasF32, ffi::DataType::F32)
