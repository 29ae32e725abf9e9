// CUDA implementations of the mask ops: topk_mask, nm_mask, rebuild_mask.
// Semantics: barber/reference.py; kernels: csrc/core/mask_kernels.cuh (torch-free). Each op
// validates like the CPU one (csrc/mask_checks.h), runs on the input's device and current
// stream, then reads back one int of error bits (a sync) to raise on NaN or bad N:M masks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "dispatch.h"
#include "mask_checks.h"
#include "core/mask_kernels.cuh"

namespace barber {
namespace {

// The CUDA type of a torch score type (same bits).
template <class T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <class scalar_t>
const typename CudaType<scalar_t>::type* device_scores(const at::Tensor& t) {
  using T = typename CudaType<scalar_t>::type;
  static_assert(sizeof(T) == sizeof(scalar_t), "torch and CUDA score types differ in size");
  return reinterpret_cast<const T*>(t.const_data_ptr<scalar_t>());
}

uint8_t* mask_bytes(at::Tensor& t) { return reinterpret_cast<uint8_t*>(t.mutable_data_ptr<bool>()); }

void check_grid_rows(const char* op, int64_t rows) {
  TORCH_CHECK(rows < (int64_t{1} << 31), "barber::", op, ": expected fewer than 2^31 rows on CUDA, got ", rows);
}

// Reads the kernel's error bits back (synchronises with the stream) and raises.
void raise_device_errors(const char* op, const at::Tensor& errors, int64_t m = 0) {
  checks::raise_kernel_errors(op, errors.item<int>(), m);
}

at::Tensor topk_mask_cuda(const at::Tensor& scores, int64_t k) {
  checks::check_topk(scores, k);
  check_grid_rows("topk_mask", scores.size(0));
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor in = scores.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kBool));
  at::Tensor errors = at::zeros({1}, in.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BARBER_DISPATCH_SCORES(in.scalar_type(), "barber::topk_mask", [&] {
    C10_CUDA_CHECK(kernels::launch_topk_mask(device_scores<scalar_t>(in), in.size(0), in.size(1), k,
                                             mask_bytes(out), errors.mutable_data_ptr<int>(), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_device_errors("topk_mask", errors);
  return out;
}

at::Tensor nm_mask_cuda(const at::Tensor& scores, int64_t n, int64_t m) {
  checks::check_nm(scores, n, m);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor in = scores.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kBool));
  at::Tensor errors = at::zeros({1}, in.options().dtype(at::kInt));
  if (m > core::kNmMaxGroup) check_grid_rows("nm_mask", in.size(0) * (in.size(1) / m));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BARBER_DISPATCH_SCORES(in.scalar_type(), "barber::nm_mask", [&] {
    C10_CUDA_CHECK(kernels::launch_nm_mask(device_scores<scalar_t>(in), in.size(0), in.size(1), static_cast<int>(n),
                                           static_cast<int>(m), mask_bytes(out), errors.mutable_data_ptr<int>(),
                                           stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_device_errors("nm_mask", errors);
  return out;
}

at::Tensor rebuild_mask_cuda(const at::Tensor& scores, const at::Tensor& mask, double ratio, int64_t m) {
  checks::check_rebuild(scores, mask, ratio, m);
  check_grid_rows("rebuild_mask", scores.size(0));
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor in = scores.contiguous();
  const at::Tensor kept = mask.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kBool));
  at::Tensor errors = at::zeros({1}, in.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* kept_bytes = reinterpret_cast<const uint8_t*>(kept.const_data_ptr<bool>());
  BARBER_DISPATCH_SCORES(in.scalar_type(), "barber::rebuild_mask", [&] {
    C10_CUDA_CHECK(kernels::launch_rebuild_mask(device_scores<scalar_t>(in), kept_bytes, in.size(0), in.size(1), ratio,
                                                m, mask_bytes(out), errors.mutable_data_ptr<int>(), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_device_errors("rebuild_mask", errors, m);
  return out;
}

}  // namespace
}  // namespace barber

TORCH_LIBRARY_IMPL(barber, CUDA, m) {
  m.impl("topk_mask", &barber::topk_mask_cuda);
  m.impl("nm_mask", &barber::nm_mask_cuda);
  m.impl("rebuild_mask", &barber::rebuild_mask_cuda);
}
