// The public op timm_dcl::ktg_loss of the fused Knowledge Transfer Graph loss (SPEC §2):
// the op schemas, the argument checking shared by the CPU and CUDA kernels (declared in
// ktg_loss.h), and the autograd in C++, so that a training step runs no Python between
// the forward and the backward kernel. The kernels are in ktg_loss.cpp (CPU) and
// ktg_loss_cuda.cu (CUDA); this file is also the Python module timm_dcl._C.
#include <Python.h>

#define KTG_HOST_API
#include "ktg_loss.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace ktg {

// ---------------------------------------------------------------------------------
// Argument checking (shared with the CUDA backend through ktg_loss.h). The messages are
// those of timm_dcl/ops/inputs.py, so the fused op and the reference raise alike.
// ---------------------------------------------------------------------------------
at::ScalarType accumulate_type(at::ScalarType logits_type) {
  return logits_type == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// A shape as Python prints a tuple: (3, 4), (3,).
std::string py_shape(c10::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + (sizes.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

bool is_float_logits(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

Call prepare_call(at::TensorList logits, const at::Tensor& labels, c10::IntArrayRef gates,
                  double temperature, double progress,
                  const std::optional<at::Tensor>& progress_tensor, const char* op) {
  TORCH_CHECK_TYPE(!logits.empty(),
                   "logits must be a tensor [M, B, C] or a non-empty sequence of M tensors [B, C]");
  Call call;
  const at::Tensor& first = logits[0];
  call.stacked = logits.size() == 1 && first.dim() == 3;
  if (call.stacked) {
    call.M = first.size(0);
    call.B = first.size(1);
    call.C = first.size(2);
  } else {
    call.M = static_cast<int64_t>(logits.size());
    for (size_t n = 0; n < logits.size(); ++n) {
      const at::Tensor& zn = logits[n];
      TORCH_CHECK_VALUE(zn.dim() == 2, "logits[", n, "] must be [B, C], got shape ", py_shape(zn.sizes()));
      if (n == 0) continue;
      if (zn.sizes() != first.sizes()) {
        TORCH_CHECK_VALUE(false, zn.size(0) != first.size(0) ? "batch sizes" : "class counts",
                          " differ: logits[0] is ", py_shape(first.sizes()), " but logits[", n, "] is ",
                          py_shape(zn.sizes()));
      }
      TORCH_CHECK_VALUE(zn.device() == first.device(), "logits[", n, "] is on ", zn.device(),
                        " but logits[0] is on ", first.device());
      TORCH_CHECK_TYPE(zn.scalar_type() == first.scalar_type(), "logits[", n, "] is ",
                       py_dtype(zn.scalar_type()), " but logits[0] is ", py_dtype(first.scalar_type()),
                       "; use one dtype");
    }
    call.B = first.size(0);
    call.C = first.size(1);
  }
  const int64_t M = call.M, B = call.B, C = call.C;
  TORCH_CHECK_TYPE(is_float_logits(first.scalar_type()),
                   "logits must be float16, bfloat16, float32 or float64, got ", py_dtype(first.scalar_type()));
  TORCH_CHECK_VALUE(M >= 1, "logits have no nodes (M = 0)");
  TORCH_CHECK_VALUE(B >= 1, "logits have an empty batch (B = 0)");
  TORCH_CHECK_VALUE(C >= 1, "logits have no classes (C = 0)");
  TORCH_CHECK_VALUE(M <= kMaxNodes, op, ": the fused kernels support at most ", kMaxNodes,
                    " nodes, got M = ", M);
  TORCH_CHECK_VALUE(B <= INT32_MAX && C <= INT32_MAX, op,
                    ": batch size and class count must be below 2^31, got B = ", B, ", C = ", C);

  const auto ltype = labels.scalar_type();
  call.soft = at::isFloatingType(ltype) && labels.dim() == 2;
  if (call.soft) {
    // Target probabilities [B, C] (mixup, label smoothing): read in the accumulation dtype.
    TORCH_CHECK_VALUE(labels.size(0) == B && labels.size(1) == C, "soft labels (target probabilities) must be "
                      "[B, C] = ", py_shape({B, C}), " like the logits, got shape ", py_shape(labels.sizes()));
    TORCH_CHECK_VALUE(labels.device() == first.device(), "labels are on ", labels.device(),
                      " but logits are on ", first.device());
    const auto acc = accumulate_type(first.scalar_type());
    call.targets = ltype == acc ? labels.contiguous() : labels.to(acc).contiguous();
  } else {
    TORCH_CHECK_TYPE(!at::isFloatingType(ltype) && !at::isComplexType(ltype) && ltype != at::kBool,
                     "labels must be an integer tensor (int64) [B] of classes or a floating tensor [B, C] of "
                     "target probabilities, got ", py_dtype(ltype), " of shape ", py_shape(labels.sizes()));
    TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == B, "labels must be [B] with B = ", B,
                      " (the logits' batch), got shape ", py_shape(labels.sizes()));
    TORCH_CHECK_VALUE(labels.device() == first.device(), "labels are on ", labels.device(),
                      " but logits are on ", first.device());
    call.labels = ltype == at::kLong ? labels.contiguous() : labels.to(at::kLong).contiguous();
  }

  TORCH_CHECK_VALUE(static_cast<int64_t>(gates.size()) == M * M, op, ": gates must hold M*M = ",
                    M * M, " codes (row-major, gates[t*M + s] = edge s -> t), got ", gates.size());
  for (int64_t i = 0; i < M * M; ++i) {
    TORCH_CHECK_VALUE(gates[i] >= 0 && gates[i] < kNumGateCodes, op, ": gate code ", gates[i],
                      " of the edge ", i % M, " -> ", i / M,
                      " is not 0 (through), 1 (cutoff), 2 (linear) or 3 (correct)");
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be a finite number > 0, got ", temperature);
  if (progress_tensor.has_value() && progress_tensor->defined()) {
    const at::Tensor& p = *progress_tensor;
    TORCH_CHECK_VALUE(p.numel() == 1 && p.dim() <= 1,
                      "progress must be a number or a tensor of one element, got shape ", py_shape(p.sizes()));
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), "progress must be a floating tensor, got ",
                     py_dtype(p.scalar_type()));
    TORCH_CHECK_VALUE(p.device() == first.device() || p.device().is_cpu(), "progress is on ", p.device(),
                      " but logits are on ", first.device(), " (use the logits' device or the CPU)");
    TORCH_CHECK_TYPE(p.device().is_cpu() || p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                     "a progress tensor on ", p.device(), " must be float32 or float64, got ",
                     py_dtype(p.scalar_type()));
  } else {
    TORCH_CHECK_VALUE(std::isfinite(progress), "progress must be finite (k/K in [0, 1]), got ", progress);
  }

  // Rows must have unit stride along the classes; anything else is copied once here.
  if (call.stacked) {
    const at::Tensor z = first.stride(2) == 1 || C == 1 ? first : first.contiguous();
    call.rows.push_back(z);
    for (int64_t n = 0; n < M; ++n) {
      call.node_offset[n] = n * z.stride(0);
      call.row_stride[n] = z.stride(1);
    }
  } else {
    call.rows.reserve(M);
    for (int64_t n = 0; n < M; ++n) {
      const at::Tensor& zn = logits[n];
      call.rows.push_back(zn.stride(1) == 1 || C == 1 ? zn : zn.contiguous());
      call.node_offset[n] = 0;
      call.row_stride[n] = call.rows[n].stride(0);
    }
  }
  call.plan = make_plan(gates.data(), static_cast<int>(M), temperature);
  return call;
}

void soft_target_classes(Call& call) {
  if (!call.soft) return;
  bool any_correct = false;
  for (int t = 0; t < call.plan.M; ++t) any_correct |= call.plan.correct_in[t] != 0;
  // torch.argmax returns the first maximal index: ties go to the lowest class, as SPEC §2 says.
  if (any_correct) call.labels = at::argmax(call.targets, 1).contiguous();
}

Progress resolve_progress(double progress, const std::optional<at::Tensor>& progress_tensor,
                          const c10::Device& device) {
  Progress p{progress, nullptr, false};
  if (!progress_tensor.has_value() || !progress_tensor->defined()) return p;
  const at::Tensor& t = *progress_tensor;
  if (t.device() != device) {  // a CPU scalar for a GPU kernel: read it here, no sync needed
    p.value = t.item<double>();
    return p;
  }
  if (t.scalar_type() != at::kDouble && t.scalar_type() != at::kFloat) {
    p.value = t.item<double>();  // CPU only: prepare_call refuses other dtypes on a GPU
    return p;
  }
  p.ptr = t.const_data_ptr();
  p.is_double = t.scalar_type() == at::kDouble;
  return p;
}

void check_backward_extras(const Call& call, const at::Tensor& grad_losses, const at::Tensor& stats,
                           at::ScalarType logits_type, const c10::Device& device, const char* op) {
  TORCH_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == call.M, op,
                    ": grad_losses must be [M] with M = ", call.M, ", got shape ", grad_losses.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_losses.scalar_type()), op,
                   ": grad_losses must be a floating tensor, got ", grad_losses.scalar_type());
  TORCH_CHECK_VALUE(grad_losses.device() == device, op, ": grad_losses are on ", grad_losses.device(),
                    " but logits are on ", device);
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == call.M && stats.size(1) == call.B &&
                        stats.size(2) == kStatCols,
                    op, ": stats must be [M, B, ", static_cast<int>(kStatCols), "] = [", call.M, ", ",
                    call.B, ", ", static_cast<int>(kStatCols), "], got shape ", stats.sizes());
  const auto acc = accumulate_type(logits_type);
  TORCH_CHECK_TYPE(stats.scalar_type() == acc, op, ": stats must be ", acc, " for ", logits_type,
                   " logits, got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.device() == device, op, ": stats are on ", stats.device(),
                    " but logits are on ", device);
}

std::vector<at::Tensor> make_grads(const Call& call, const at::TensorOptions& options) {
  std::vector<at::Tensor> grads;
  if (call.stacked) {
    grads.push_back(at::empty({call.M, call.B, call.C}, options));
  } else {
    grads.reserve(call.M);
    for (int64_t n = 0; n < call.M; ++n) grads.push_back(at::empty({call.B, call.C}, options));
  }
  return grads;
}

// ---------------------------------------------------------------------------------
// The public op timm_dcl::ktg_loss and its autograd, in C++: a training step pays no
// Python between the forward and the backward kernel.
// ---------------------------------------------------------------------------------
namespace {

using torch::autograd::variable_list;

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    at::TensorList, const at::Tensor&, c10::IntArrayRef, double, double, const std::optional<at::Tensor>&)>&
forward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("timm_dcl::ktg_loss_forward", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor>(
                                     at::TensorList, const at::Tensor&, c10::IntArrayRef, double, double,
                                     const std::optional<at::Tensor>&)>();
  return handle;
}

const c10::TypedOperatorHandle<std::vector<at::Tensor>(
    const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, c10::IntArrayRef, double, double,
    const std::optional<at::Tensor>&)>&
backward_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("timm_dcl::ktg_loss_backward", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&,
                                         c10::IntArrayRef, double, double, const std::optional<at::Tensor>&)>();
  return handle;
}

// The backward of ktg_loss as an autograd node written by hand, as PyTorch's generated
// code writes its own: plain members instead of torch::autograd::Function's context (a
// hash map of IValues, per-input bookkeeping), which at small shapes cost as much as the
// kernels. Its one input is the gradient of the losses [M] (read with its strides, e.g.
// the stride-0 expansion of the backward of losses.sum()); its outputs are the gradients
// of the logits, one per tensor the op was given.
struct KtgLossBackward : public torch::autograd::Node {
  std::vector<torch::autograd::SavedVariable> logits;
  torch::autograd::SavedVariable labels, stats, progress_tensor;
  std::vector<int64_t> gates;
  double temperature = 1.0, progress = 1.0;
  bool has_progress_tensor = false;

  std::string name() const override { return "KtgLossBackward"; }

  void release_variables() override {
    for (auto& v : logits) v.reset_data();
    labels.reset_data();
    stats.reset_data();
    progress_tensor.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const size_t n = logits.size();
    variable_list out(n);
    bool wanted = false;
    for (size_t i = 0; i < n; ++i) wanted = wanted || should_compute_output(i);
    if (!grads[0].defined() || !wanted) return out;  // no gradient flows: zero, left undefined
    std::vector<at::Tensor> z;
    z.reserve(n);
    for (const auto& v : logits) z.push_back(v.unpack());
    std::optional<at::Tensor> pt;
    if (has_progress_tensor) pt = progress_tensor.unpack();
    std::vector<at::Tensor> g = backward_op().call(grads[0], z, labels.unpack(), stats.unpack(), gates,
                                                   temperature, progress, pt);
    for (size_t i = 0; i < n; ++i) {
      if (should_compute_output(i)) out[i] = std::move(g[i]);
    }
    return out;
  }
};

// torch 2.14 holds autograd nodes in c10::intrusive_ptr, earlier releases in std::shared_ptr:
// the node is made the way the torch it is built against holds it.
template <typename T>
auto make_autograd_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>) {
    return c10::make_intrusive<T>();
  } else {
    return std::make_shared<T>();
  }
}

// Validated labels: int64 [B], or soft targets [B, C] in the accumulation dtype.
at::Tensor validated_labels(at::TensorList logits, const at::Tensor& labels, c10::IntArrayRef gates,
                            double temperature, double progress,
                            const std::optional<at::Tensor>& progress_tensor) {
  return kernel_labels(
      prepare_call(logits, labels, gates, temperature, progress, progress_tensor, "timm_dcl::ktg_loss"));
}

at::Tensor ktg_loss_autograd(at::TensorList logits, const at::Tensor& labels, c10::IntArrayRef gates,
                             double temperature, double progress,
                             const std::optional<at::Tensor>& progress_tensor) {
  // Checked here, above the kernels, so that bad input (logits on two devices, say)
  // gets its message before the dispatcher picks a kernel for it.
  const at::Tensor y = validated_labels(logits, labels, gates, temperature, progress, progress_tensor);
  bool requires_grad = false;
  if (c10::GradMode::is_enabled()) {
    for (const at::Tensor& t : logits) requires_grad = requires_grad || t.requires_grad();
  }
  at::Tensor losses, stats;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(losses, stats) = forward_op().call(logits, y, gates, temperature, progress, progress_tensor);
  }
  if (!requires_grad) return losses;
  auto node = make_autograd_node<KtgLossBackward>();
  torch::autograd::edge_list edges;
  edges.reserve(logits.size());
  node->logits.reserve(logits.size());
  for (const at::Tensor& t : logits) {
    edges.push_back(torch::autograd::impl::gradient_edge(t));
    node->logits.emplace_back(t, /*is_output=*/false);
  }
  node->set_next_edges(std::move(edges));
  node->labels = torch::autograd::SavedVariable(y, false);
  node->stats = torch::autograd::SavedVariable(stats, false);
  node->has_progress_tensor = progress_tensor.has_value() && progress_tensor->defined();
  if (node->has_progress_tensor) node->progress_tensor = torch::autograd::SavedVariable(*progress_tensor, false);
  node->gates.assign(gates.begin(), gates.end());
  node->temperature = temperature;
  node->progress = progress;
  torch::autograd::set_history(losses, node);
  return losses;
}

// Below autograd (inference mode, or tracing without gradients): the forward alone.
at::Tensor ktg_loss_no_grad(at::TensorList logits, const at::Tensor& labels, c10::IntArrayRef gates,
                            double temperature, double progress,
                            const std::optional<at::Tensor>& progress_tensor) {
  const at::Tensor y = validated_labels(logits, labels, gates, temperature, progress, progress_tensor);
  return std::get<0>(forward_op().call(logits, y, gates, temperature, progress, progress_tensor));
}

}  // namespace
}  // namespace ktg

TORCH_LIBRARY(timm_dcl, m) {
  m.def(
      "ktg_loss(Tensor[] logits, Tensor labels, int[] gates, float temperature=1.0, "
      "float progress=1.0, Tensor? progress_tensor=None) -> Tensor");
  m.def(
      "ktg_loss_forward(Tensor[] logits, Tensor labels, int[] gates, float temperature, "
      "float progress, Tensor? progress_tensor) -> (Tensor, Tensor)");
  m.def(
      "ktg_loss_backward(Tensor grad_losses, Tensor[] logits, Tensor labels, Tensor stats, "
      "int[] gates, float temperature, float progress, Tensor? progress_tensor) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(timm_dcl, Autograd, m) {
  m.impl("ktg_loss", &ktg::ktg_loss_autograd);
}

TORCH_LIBRARY_IMPL(timm_dcl, CompositeExplicitAutograd, m) {
  m.impl("ktg_loss", &ktg::ktg_loss_no_grad);
}


// The torch version the library was compiled against, findable in the file without
// loading it: timm_dcl/ops/_extension.py reads it to refuse a library built for another
// torch (whose registrations would run, and could crash, as soon as it is loaded).
#define KTG_STRINGIFY_(a) #a
#define KTG_STRINGIFY(a) KTG_STRINGIFY_(a)
extern "C" __attribute__((used, visibility("default"))) const char timm_dcl_build_info[] =
    "timm_dcl-build:torch=" KTG_STRINGIFY(TORCH_VERSION_MAJOR) "." KTG_STRINGIFY(
        TORCH_VERSION_MINOR) "." KTG_STRINGIFY(TORCH_VERSION_PATCH) ";";

// The shared library is also the Python module timm_dcl._C: importing it runs the
// registrations above. The module itself is empty.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define KTG_CONCAT_(a, b) a##b
#define KTG_CONCAT(a, b) KTG_CONCAT_(a, b)

PyMODINIT_FUNC KTG_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, KTG_STRINGIFY(TORCH_EXTENSION_NAME),
                               "Fused kernels of timm_dcl (registered as torch.ops.timm_dcl)",
                               -1, nullptr};
  return PyModule_Create(&module);
}

