// Compile-only check of the torch-free packing kernels (csrc/core/pack_kernels.cuh):
// CMakeLists.txt builds this object with plain nvcc, so every kernel template is
// instantiated for every element type the ops support, without torch or a GPU.
#include "core/pack_kernels.cuh"

namespace barber {
namespace pack_kernels {

template __global__ void pack24_kernel<__half>(const __half*, __half*, uint16_t*, int64_t, int64_t,
                                               unsigned long long*);
template __global__ void pack24_kernel<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, uint16_t*, int64_t,
                                                      int64_t, unsigned long long*);
template __global__ void pack24_kernel<int8_t>(const int8_t*, int8_t*, uint32_t*, int64_t, int64_t,
                                               unsigned long long*);

template __global__ void unpack24_kernel<__half>(const __half*, const uint16_t*, __half*, int64_t, int64_t,
                                                 unsigned long long*);
template __global__ void unpack24_kernel<__nv_bfloat16>(const __nv_bfloat16*, const uint16_t*, __nv_bfloat16*,
                                                        int64_t, int64_t, unsigned long long*);
template __global__ void unpack24_kernel<int8_t>(const int8_t*, const uint32_t*, int8_t*, int64_t, int64_t,
                                                 unsigned long long*);

}  // namespace pack_kernels
}  // namespace barber

// The bitmask kernels are not templates; taking their addresses makes sure they are emitted.
void* barber_pack_bitmask_kernels[] = {reinterpret_cast<void*>(&barber::pack_kernels::pack_bitmask_kernel),
                                       reinterpret_cast<void*>(&barber::pack_kernels::unpack_bitmask_kernel)};
