// The few libtorch C++ features the worker needs that tch 0.24 does not wrap:
//
// - a hook run after a parameter's gradient is final in a backward pass (libtorch's
//   post-accumulate-grad hook), which lets the worker start reducing a gradient bucket while
//   backward still runs (`torch_ext::grad_hook`);
// - the set of parameters a backward pass from a given root will reach (a walk of the autograd
//   graph down to its AccumulateGrad nodes), so the ones it will not reach count as final
//   from the start;
// - a host-to-GPU copy on a CUDA stream of its own, ordered before the compute stream's next
//   use by an event, so an upload runs under the kernels of the step before it
//   (`torch_ext::upload`).
//
// Only device-generic c10 interfaces are used (c10::Stream, c10::Event, the device guard
// implementation of the CUDA backend), so this file compiles against the PyTorch wheel's
// headers without the CUDA toolkit. Every function catches C++ exceptions and reports them as
// text: no exception crosses into Rust.

#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

extern "C" {
// Called on the thread that runs the backward pass, once the gradient of the parameter the
// hook was set on is final (all its contributions accumulated into `.grad`).
typedef void (*contrail_grad_ready_fn)(void* ctx, size_t index);
}

namespace {

int report(const std::exception& e, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0) {
    std::strncpy(err, e.what(), err_len - 1);
    err[err_len - 1] = '\0';
  }
  return 1;
}

struct GradReadyHook final : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(contrail_grad_ready_fn callback, void* ctx, size_t index)
      : callback_(callback), ctx_(ctx), index_(index) {}
  void operator()(const torch::autograd::Variable& /*param*/) override {
    callback_(ctx_, index_);
  }

 private:
  contrail_grad_ready_fn callback_;
  void* ctx_;
  size_t index_;
};

// One copy stream per GPU, taken from libtorch's pool (non-blocking streams) on first use.
c10::Stream copy_stream(const c10::impl::DeviceGuardImplInterface* impl, c10::Device device) {
  static std::mutex lock;
  static std::unordered_map<c10::DeviceIndex, c10::Stream> streams;
  std::lock_guard<std::mutex> guard(lock);
  auto found = streams.find(device.index());
  if (found != streams.end()) {
    return found->second;
  }
  c10::Stream s = impl->getStreamFromGlobalPool(device, /*isHighPriority=*/false);
  streams.emplace(device.index(), s);
  return s;
}

}  // namespace

extern "C" {

// Sets (replacing any earlier one) the hook that calls `callback(ctx, index)` when `param`'s
// gradient is final in a backward pass. `param` must be a leaf that requires grad.
int contrail_set_grad_ready_hook(const at::Tensor* param, contrail_grad_ready_fn callback,
                                 void* ctx, size_t index, char* err, size_t err_len) {
  try {
    TORCH_CHECK(param->defined() && param->requires_grad() && param->is_leaf(),
                "a gradient-ready hook needs a leaf tensor that requires grad");
    torch::autograd::impl::set_post_acc_grad_hooks(
        *param, std::make_unique<GradReadyHook>(callback, ctx, index));
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

// Removes `param`'s gradient-ready hook (none set: nothing happens).
int contrail_clear_grad_ready_hook(const at::Tensor* param, char* err, size_t err_len) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(*param, nullptr);
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

// reached[i] = 1 when a backward pass from `root` accumulates into `leaves[i]`, else 0.
int contrail_reached_leaves(const at::Tensor* root, const at::Tensor* const* leaves, size_t n,
                            uint8_t* reached, char* err, size_t err_len) {
  try {
    std::unordered_map<const c10::TensorImpl*, size_t> index;
    for (size_t i = 0; i < n; ++i) {
      reached[i] = 0;
      index.emplace(leaves[i]->unsafeGetTensorImpl(), i);
    }
    if (!root->defined() || !root->requires_grad()) {
      return 0;
    }
    if (root->is_leaf()) {
      auto it = index.find(root->unsafeGetTensorImpl());
      if (it != index.end()) {
        reached[it->second] = 1;
      }
      return 0;
    }
    std::vector<torch::autograd::Node*> stack{root->grad_fn().get()};
    std::unordered_set<torch::autograd::Node*> seen{stack.back()};
    while (!stack.empty()) {
      torch::autograd::Node* node = stack.back();
      stack.pop_back();
      if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
        auto it = index.find(acc->variable.unsafeGetTensorImpl());
        if (it != index.end()) {
          reached[it->second] = 1;
        }
      }
      for (const auto& edge : node->next_edges()) {
        torch::autograd::Node* next = edge.function.get();
        if (next != nullptr && seen.insert(next).second) {
          stack.push_back(next);
        }
      }
    }
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

// `*out` = `src` copied to `cuda:device_index` on that GPU's copy stream, asynchronously when
// `src` is pinned. The GPU's current (compute) stream waits for the copy through an event
// before its next kernel, and the result is recorded as used on the compute stream, so the
// caching allocator does not hand its memory to the copy stream again while compute may
// still read it. The caller owns `*out` (a tch tensor).
int contrail_upload_on_copy_stream(const at::Tensor* src, int device_index, at::Tensor** out,
                                   char* err, size_t err_len) {
  try {
    const c10::Device device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_index));
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Stream compute = impl->getStream(device);
    const c10::Stream copy = copy_stream(impl, device);
    const c10::Stream previous = impl->exchangeStream(copy);
    std::optional<at::Tensor> copied;
    try {
      copied = src->to(device, src->scalar_type(), /*non_blocking=*/true, /*copy=*/false);
    } catch (...) {
      impl->exchangeStream(previous);
      throw;
    }
    impl->exchangeStream(previous);
    c10::Event done(c10::DeviceType::CUDA);
    done.record(copy);
    done.block(compute);
    copied->record_stream(compute);
    *out = new at::Tensor(std::move(*copied));
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

}  // extern "C"
