// Argument checks of lerpfast::combine, shared by its CPU, CUDA and composite kernels: a kernel that skipped them
// would read out of bounds (on a GPU, an illegal address that poisons the whole CUDA context) instead of raising.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lerpfast {

// Shapes, dtypes and devices: no host-device synchronisation.
inline void check_points(const at::Tensor& anchors, const std::optional<at::Tensor>& dirs, const at::Tensor& anchor_idx,
                         const at::Tensor& coefs) {
  TORCH_CHECK(anchors.dim() >= 1, "lerpfast::combine: anchors must be (M, *S), got a 0-d tensor");
  TORCH_CHECK(anchor_idx.dim() == 1 && anchor_idx.scalar_type() == at::kLong,
              "lerpfast::combine: anchor_idx must be a 1-d int64 tensor, got ", anchor_idx.dim(), "-d ",
              anchor_idx.scalar_type());
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == anchor_idx.size(0),
              "lerpfast::combine: coefs must be (K, J) with K = len(anchor_idx) = ", anchor_idx.size(0), ", got ",
              coefs.sizes());
  TORCH_CHECK(at::isFloatingType(coefs.scalar_type()), "lerpfast::combine: coefs must be floating point, got ",
              coefs.scalar_type());
  TORCH_CHECK(anchor_idx.device() == anchors.device() && coefs.device() == anchors.device(),
              "lerpfast::combine: anchors (", anchors.device(), "), anchor_idx (", anchor_idx.device(),
              ") and coefs (", coefs.device(), ") must be on one device");
  if (dirs.has_value()) {
    TORCH_CHECK(dirs->dim() == anchors.dim() && dirs->sizes().slice(1) == anchors.sizes().slice(1),
                "lerpfast::combine: dirs must be (J, *S) with the anchors' *S ", anchors.sizes().slice(1), ", got ",
                dirs->sizes());
    TORCH_CHECK(dirs->size(0) >= coefs.size(1), "lerpfast::combine: ", coefs.size(1), " coefficient columns but only ",
                dirs->size(0), " dirs");
    TORCH_CHECK(dirs->scalar_type() == anchors.scalar_type(), "lerpfast::combine: dirs (", dirs->scalar_type(),
                ") and anchors (", anchors.scalar_type(), ") differ in dtype");
    TORCH_CHECK(dirs->device() == anchors.device(), "lerpfast::combine: dirs (", dirs->device(), ") and anchors (",
                anchors.device(), ") must be on one device");
  }
}

// Every anchor index in [0, M). Reads anchor_idx on the host: a device-to-host copy for CUDA tensors, which the CUDA
// kernel skips only while a CUDA graph is being captured (the eager warm-up calls before the capture checked them).
inline void check_index_range(const at::Tensor& anchor_idx, int64_t M) {
  if (anchor_idx.numel() == 0) return;
  const auto minmax = at::aminmax(anchor_idx);
  const int64_t lo = std::get<0>(minmax).item<int64_t>();
  const int64_t hi = std::get<1>(minmax).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < M, "lerpfast::combine: anchor_idx holds ", (lo < 0 ? lo : hi), ", outside [0, ", M,
              ") (the number of anchors)");
}

}  // namespace lerpfast
