// CUDA kernels of lerpfast._C, compiled only when setup.py finds a CUDA toolkit and a CUDA build of torch
// (or LERPFAST_BUILD_CUDA=1); registered under the CUDA dispatch key of the ops defined in lerpfast_ops.cpp.
//
// combine: out[k, i] = anchors[idx_k, i] + sum_j c[k, j] * dirs[j, i], one pass, one element per thread per
// grid-stride step (scalar 32-bit loads; vectorizing is for after a first GPU measurement). It replaces the 1 + 2J
// elementwise passes of the torch combine on the materialize-per-layer path. Its arguments pass the checks of
// checks.h (shapes, dtypes, devices, index range) before any launch. Status: NOT yet benchmarked on a GPU (no device was lent when it was written);
// per DESIGN section 4 it stays only if bench_kernels.py shows it beating the torch and Triton combines.
// __fmul_rn / __fadd_rn forbid FMA contraction, so results are bit-identical to the torch combine.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include "checks.h"

namespace lerpfast {

namespace {

template <int J_MAX>
__global__ void combine_f32_kernel(const float* __restrict__ anchors, const float* __restrict__ dirs,
                                   const int64_t* __restrict__ idx, const float* __restrict__ coefs,
                                   float* __restrict__ out, int64_t S, int J) {
  const int64_t k = blockIdx.y;
  const int64_t a = idx[k];
  const float* src = anchors + a * S;
  float* dst = out + k * S;
  float c[J_MAX];
#pragma unroll
  for (int j = 0; j < J_MAX; ++j) c[j] = j < J ? coefs[k * J + j] : 0.f;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < S; i += stride) {
    float v = src[i];
#pragma unroll
    for (int j = 0; j < J_MAX; ++j) {
      if (j < J) v = __fadd_rn(v, __fmul_rn(c[j], dirs[(int64_t)j * S + i]));
    }
    dst[i] = v;
  }
}

at::Tensor combine_cuda(const at::Tensor& anchors, const std::optional<at::Tensor>& dirs, const at::Tensor& anchor_idx,
                        const at::Tensor& coefs) {
  check_points(anchors, dirs, anchor_idx, coefs);
  // The index range needs anchor_idx on the host: not while a CUDA graph is captured (no synchronisation allowed
  // there; the eager calls before the capture checked the same indices).
  if (at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None) {
    check_index_range(anchor_idx, anchors.size(0));
  }
  const int64_t J = dirs.has_value() ? coefs.size(1) : 0;
  if (anchors.scalar_type() != at::kFloat || J > 4 || anchor_idx.size(0) > 65535) {
    // Only fp32 with <= 4 directions and K <= 65535 (grid.y) has a hand kernel; the rest use the ATen sequence.
    at::Tensor out = anchors.index_select(0, anchor_idx);
    std::vector<int64_t> view(anchors.dim(), 1);
    view[0] = coefs.size(0);
    at::Tensor c = coefs.to(anchors.scalar_type());
    for (int64_t j = 0; j < J; ++j) out = out + c.select(1, j).reshape(view) * dirs->select(0, j);
    return out;
  }
  c10::cuda::CUDAGuard guard(anchors.device());
  const int64_t K = anchor_idx.size(0);
  const int64_t M = anchors.size(0);
  const int64_t S = anchors.numel() / std::max<int64_t>(M, 1);
  at::Tensor a = anchors.contiguous();
  at::Tensor d = J ? dirs->contiguous() : a;
  at::Tensor idx = anchor_idx.contiguous();
  at::Tensor c = coefs.to(at::kFloat).contiguous();
  std::vector<int64_t> shape(anchors.sizes().begin(), anchors.sizes().end());
  shape[0] = K;
  at::Tensor out = at::empty(shape, anchors.options());
  if (K == 0 || S == 0) return out;
  const int threads = 256;
  const int64_t blocks_x = std::min<int64_t>((S + threads - 1) / threads, 4096);
  dim3 grid((unsigned)blocks_x, (unsigned)K);
  combine_f32_kernel<4><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<float>(), d.data_ptr<float>(), idx.data_ptr<int64_t>(), c.data_ptr<float>(), out.data_ptr<float>(),
      S, (int)J);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lerpfast, CUDA, m) { m.impl("combine", &combine_cuda); }

}  // namespace lerpfast
