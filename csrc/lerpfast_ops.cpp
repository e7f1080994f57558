// lerpfast._C: multi-point ops registered with the PyTorch dispatcher (TORCH_LIBRARY), so they are
// callable as torch.ops.lerpfast.* and compose with torch.compile (Dynamo sees opaque custom ops; the
// CompositeExplicitAutograd kernels below also serve the Meta/fake-tensor key, giving output shapes).
//
// Kernels per op and dispatch key:
//   combine      CPU: hand loop (one pass, parallel over points)   CUDA: csrc/lerpfast_cuda.cu (if built)
//                CompositeExplicitAutograd: ATen ops (every other device, Meta)
//   lerp_linear  CompositeExplicitAutograd: combine + bmm, or the shared-input basis form
//
// Rounding contract (docs/architecture.md): W_k = anchors[idx_k] + sum_j coefs[k, j] * dirs[j], one
// rounding per term in order j = 0..J-1. setup.py compiles with -ffp-contract=off so no FMA merges a
// product into its sum; the CPU combine is then bit-identical to lerpfast.engine.functional.combine.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "checks.h"

namespace lerpfast {

namespace {

std::vector<int64_t> points_shape(const at::Tensor& anchors, int64_t K) {
  std::vector<int64_t> shape(anchors.sizes().begin(), anchors.sizes().end());
  shape[0] = K;
  return shape;
}

}  // namespace

// Device-agnostic combine from ATen ops: the exact sequence of lerpfast.engine.functional.combine.
at::Tensor combine_composite(const at::Tensor& anchors, const std::optional<at::Tensor>& dirs,
                             const at::Tensor& anchor_idx, const at::Tensor& coefs) {
  check_points(anchors, dirs, anchor_idx, coefs);  // (index range: index_select checks it; Meta has no values)
  at::Tensor out = anchors.index_select(0, anchor_idx);
  if (!dirs.has_value() || coefs.size(1) == 0) return out;
  std::vector<int64_t> view(anchors.dim(), 1);
  view[0] = coefs.size(0);
  at::Tensor c = coefs.to(anchors.scalar_type());
  for (int64_t j = 0; j < coefs.size(1); ++j) {
    out = out + c.select(1, j).reshape(view) * dirs->select(0, j);
  }
  return out;
}

// CPU combine: reads each source element once instead of the 1 + 2J passes above; parallel over
// (point, chunk of 4096 elements) so K = 1 with a large tensor still uses every thread.
at::Tensor combine_cpu(const at::Tensor& anchors, const std::optional<at::Tensor>& dirs, const at::Tensor& anchor_idx,
                       const at::Tensor& coefs) {
  check_points(anchors, dirs, anchor_idx, coefs);
  const int64_t K = anchor_idx.size(0);
  const int64_t M = anchors.size(0);
  const int64_t J = dirs.has_value() ? coefs.size(1) : 0;
  const int64_t S = anchors.numel() / std::max<int64_t>(M, 1);
  at::Tensor a = anchors.contiguous();
  at::Tensor d = J ? dirs->contiguous() : a;
  at::Tensor idx = anchor_idx.contiguous();
  at::Tensor c = coefs.to(anchors.scalar_type()).contiguous();
  at::Tensor out = at::empty(points_shape(anchors, K), anchors.options());
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  check_index_range(idx, M);
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, anchors.scalar_type(), "lerpfast_combine_cpu", [&] {
    const scalar_t* a_p = a.data_ptr<scalar_t>();
    const scalar_t* d_p = d.data_ptr<scalar_t>();
    const scalar_t* c_p = c.data_ptr<scalar_t>();
    scalar_t* o_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, K * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t k = t / chunks;
        const int64_t lo = (t % chunks) * kChunk;
        const int64_t hi = std::min(S, lo + kChunk);
        scalar_t* o = o_p + k * S;
        const scalar_t* src = a_p + idx_p[k] * S;
        for (int64_t i = lo; i < hi; ++i) o[i] = src[i];
        for (int64_t j = 0; j < J; ++j) {
          const scalar_t cj = c_p[k * J + j];
          const scalar_t* dj = d_p + j * S;
          // Two roundings per term (product, then sum), as torch's out + c * d does.
          for (int64_t i = lo; i < hi; ++i) {
            const scalar_t prod = cj * dj[i];
            o[i] = o[i] + prod;
          }
        }
      }
    });
  });
  return out;
}

// Multi-point linear: (K, N, in) or shared (N, in) -> (K, N, out). Mirrors lerpfast.engine.functional.lerp_linear;
// the shared form multiplies by every anchor (M is 1 or 2 in practice) to keep output shapes data-independent,
// which torch.compile's fake tensors need.
at::Tensor lerp_linear_composite(const at::Tensor& x, const at::Tensor& w_anchors, const std::optional<at::Tensor>& w_dirs,
                                 const std::optional<at::Tensor>& b_anchors, const std::optional<at::Tensor>& b_dirs,
                                 const at::Tensor& anchor_idx, const at::Tensor& coefs, bool shared_input) {
  static auto combine_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lerpfast::combine", "")
                               .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const at::Tensor&, const at::Tensor&)>();
  TORCH_CHECK(w_anchors.dim() == 3, "lerpfast::lerp_linear: w_anchors must be (M, out, in)");
  const int64_t K = anchor_idx.size(0);
  const int64_t J = w_dirs.has_value() ? coefs.size(1) : 0;
  at::Tensor out;
  if (shared_input) {
    TORCH_CHECK(x.dim() == 2, "lerpfast::lerp_linear: shared x must be (N, in)");
    at::Tensor ya = at::matmul(x, w_anchors.to(x.scalar_type()).transpose(-1, -2));  // (M, N, out)
    out = ya.index_select(0, anchor_idx);                        // (K, N, out)
    if (J > 0) {
      at::Tensor yd = at::matmul(x, w_dirs->to(x.scalar_type()).transpose(-1, -2));  // (J, N, out)
      at::Tensor c = coefs.to(yd.scalar_type());
      for (int64_t j = 0; j < J; ++j) {
        out = out + c.select(1, j).reshape({K, 1, 1}) * yd.select(0, j);
      }
    }
  } else {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == K, "lerpfast::lerp_linear: x must be (K, N, in)");
    at::Tensor weight = combine_op.call(w_anchors, w_dirs, anchor_idx, coefs);  // (K, out, in)
    out = at::bmm(x, weight.to(x.scalar_type()).transpose(1, 2));
  }
  if (b_anchors.has_value()) {
    at::Tensor bias = combine_op.call(*b_anchors, b_dirs, anchor_idx, coefs);  // (K, out)
    out = out + bias.to(out.scalar_type()).unsqueeze(1);
  }
  return out;
}

bool has_cuda_kernels() {
#ifdef LERPFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(lerpfast, m) {
  m.def("combine(Tensor anchors, Tensor? dirs, Tensor anchor_idx, Tensor coefs) -> Tensor");
  m.def("lerp_linear(Tensor x, Tensor w_anchors, Tensor? w_dirs, Tensor? b_anchors, Tensor? b_dirs, "
        "Tensor anchor_idx, Tensor coefs, bool shared_input=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lerpfast, CompositeExplicitAutograd, m) {
  m.impl("combine", &combine_composite);
  m.impl("lerp_linear", &lerp_linear_composite);
}

TORCH_LIBRARY_IMPL(lerpfast, CPU, m) { m.impl("combine", &combine_cpu); }

}  // namespace lerpfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lerpfast C++ ops; use them through torch.ops.lerpfast.*";
  m.def("has_cuda_kernels", &lerpfast::has_cuda_kernels, "True when the CUDA kernels were compiled in");
}
