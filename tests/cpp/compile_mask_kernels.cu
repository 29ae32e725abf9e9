// Compile-only check of the torch-free mask kernels (csrc/core/mask_kernels.cuh):
// CMakeLists.txt builds this object with plain nvcc, so every kernel template is
// instantiated for float, __half and __nv_bfloat16, without torch or a GPU.
#include "core/mask_kernels.cuh"

namespace barber {
namespace kernels {

#define BARBER_INSTANTIATE_MASK_KERNELS(T)                                                                        \
  template __global__ void topk_mask_kernel<T, true>(const T*, int64_t, int64_t, uint8_t*, int*);                \
  template __global__ void topk_mask_kernel<T, false>(const T*, int64_t, int64_t, uint8_t*, int*);               \
  template __global__ void nm_mask_kernel<T, 4>(const T*, int64_t, int, int, uint8_t*, int*);                   \
  template __global__ void nm_mask_kernel<T, 8>(const T*, int64_t, int, int, uint8_t*, int*);                   \
  template __global__ void nm_mask_kernel<T, 0>(const T*, int64_t, int, int, uint8_t*, int*);                   \
  template __global__ void rebuild_mask_kernel<T, true>(const T*, const uint8_t*, int64_t, double, int64_t,      \
                                                        uint8_t*, int*);                                         \
  template __global__ void rebuild_mask_kernel<T, false>(const T*, const uint8_t*, int64_t, double, int64_t,     \
                                                         uint8_t*, int*);                                        \
  template cudaError_t launch_topk_mask<T>(const T*, int64_t, int64_t, int64_t, uint8_t*, int*, cudaStream_t);    \
  template cudaError_t launch_nm_mask<T>(const T*, int64_t, int64_t, int, int, uint8_t*, int*, cudaStream_t);     \
  template cudaError_t launch_rebuild_mask<T>(const T*, const uint8_t*, int64_t, int64_t, double, int64_t,        \
                                              uint8_t*, int*, cudaStream_t);

BARBER_INSTANTIATE_MASK_KERNELS(float)
BARBER_INSTANTIATE_MASK_KERNELS(__half)
BARBER_INSTANTIATE_MASK_KERNELS(__nv_bfloat16)

#undef BARBER_INSTANTIATE_MASK_KERNELS

}  // namespace kernels
}  // namespace barber
