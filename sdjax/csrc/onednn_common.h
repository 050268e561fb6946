// What the oneDNN kernels (onednn_conv.cc, onednn_attention.cc) share: the CPU engine, the type mapping and a
// cache of plans (primitives) per shape.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace sdjax_onednn {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

template <xla::ffi::DataType T>
constexpr dnnl::memory::data_type OnednnType() {
  return T == xla::ffi::DataType::BF16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
}

// Plans by key (types, shapes, strides...): creating a primitive descriptor picks the implementation, which
// costs more than running a small kernel, so it is done once per key and kept for the process.
template <typename Plan>
class PlanCache {
 public:
  template <typename Make>
  Plan* Get(const std::vector<int64_t>& key, Make make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = plans_[key];
    if (!slot) slot = make();
    return slot.get();
  }

 private:
  std::mutex mu_;
  std::map<std::vector<int64_t>, std::unique_ptr<Plan>> plans_;
};

}  // namespace sdjax_onednn
