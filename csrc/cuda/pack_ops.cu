// CUDA implementations of the packing ops: checks (csrc/pack_checks.h), allocation and
// launches of the torch-free kernels in csrc/core/pack_kernels.cuh, on the current stream
// of the input's device. pack_24 and unpack_24 read back one error slot (a device sync)
// so that a non-2:4 group or a corrupt meta code fails loudly instead of silently.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "core/pack_kernels.cuh"
#include "pack_checks.h"

namespace barber {
namespace {

namespace pk = pack_kernels;

// kernels.cuh needs 16-byte aligned rows starting at 16-byte aligned bases.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// A one-element error slot on `device`, set to "no error".
at::Tensor error_slot(const at::Tensor& like) {
  return at::full({1}, static_cast<int64_t>(pk::kNoError), like.options().dtype(at::kLong));
}

// The flat group index recorded in `slot`, or -1 (synchronises with the stream).
int64_t read_error(const at::Tensor& slot) {
  const auto value = static_cast<unsigned long long>(slot.item<int64_t>());
  return value == pk::kNoError ? -1 : static_cast<int64_t>(value);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> pack_24_typed(const at::Tensor& in, cudaStream_t stream) {
  using Bits = typename pk::BitsOf<T>::type;
  using Meta = typename pack24::Elem<Bits>::Meta;
  const int64_t rows = in.size(0);
  const int64_t cols = in.size(1);
  const int64_t ncols = cols / pack24::word_cols<Bits>();
  at::Tensor values = at::empty({rows, cols / 2}, in.options());
  at::Tensor meta = at::empty({rows, ncols}, in.options().dtype(sizeof(Meta) == 2 ? at::kShort : at::kInt));
  at::Tensor slot = error_slot(in);
  pk::pack24_kernel<T><<<pk::blocks_for(rows * ncols), pk::kBlockThreads, 0, stream>>>(
      static_cast<const T*>(in.const_data_ptr()), static_cast<T*>(values.mutable_data_ptr()),
      static_cast<Meta*>(meta.mutable_data_ptr()), rows, cols,
      reinterpret_cast<unsigned long long*>(slot.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bad = read_error(slot);
  if (bad >= 0) pack_checks::fail_not_24(in, bad);
  return {values, meta};
}

template <typename T>
at::Tensor unpack_24_typed(const at::Tensor& values, const at::Tensor& meta, cudaStream_t stream) {
  using Bits = typename pk::BitsOf<T>::type;
  using Meta = typename pack24::Elem<Bits>::Meta;
  const int64_t rows = values.size(0);
  const int64_t cols = 2 * values.size(1);
  const int64_t ncols = cols / pack24::word_cols<Bits>();
  at::Tensor dense = at::empty({rows, cols}, values.options());
  at::Tensor slot = error_slot(values);
  pk::unpack24_kernel<T><<<pk::blocks_for(rows * ncols), pk::kBlockThreads, 0, stream>>>(
      static_cast<const T*>(values.const_data_ptr()), static_cast<const Meta*>(meta.const_data_ptr()),
      static_cast<T*>(dense.mutable_data_ptr()), rows, cols,
      reinterpret_cast<unsigned long long*>(slot.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bad = read_error(slot);
  if (bad >= 0) pack_checks::fail_bad_meta(values, bad);
  return dense;
}

std::tuple<at::Tensor, at::Tensor> pack_24_cuda(const at::Tensor& dense) {
  pack_checks::check_pack_24(dense);
  const c10::cuda::CUDAGuard guard(dense.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor in = aligned_contiguous(dense);
  switch (dense.scalar_type()) {
    case at::kHalf:
      return pack_24_typed<__half>(in, stream);
    case at::kBFloat16:
      return pack_24_typed<__nv_bfloat16>(in, stream);
    default:
      return pack_24_typed<int8_t>(in, stream);  // check_pack_24 allowed only int8 besides
  }
}

at::Tensor unpack_24_cuda(const at::Tensor& values, const at::Tensor& meta) {
  pack_checks::check_unpack_24(values, meta);
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor v = aligned_contiguous(values);
  const at::Tensor m = meta.contiguous();
  switch (values.scalar_type()) {
    case at::kHalf:
      return unpack_24_typed<__half>(v, m, stream);
    case at::kBFloat16:
      return unpack_24_typed<__nv_bfloat16>(v, m, stream);
    default:
      return unpack_24_typed<int8_t>(v, m, stream);
  }
}

at::Tensor pack_bitmask_cuda(const at::Tensor& mask_in) {
  pack_checks::check_pack_bitmask(mask_in);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = aligned_contiguous(mask_in);  // 8-byte loads when cols % 8 == 0
  const int64_t rows = mask.size(0);
  const int64_t cols = mask.size(1);
  at::Tensor bits = at::empty({rows, bitmask::packed_cols(cols)}, mask.options().dtype(at::kByte));
  if (bits.numel() == 0) return bits;
  pk::pack_bitmask_kernel<<<pk::blocks_for(bits.numel()), pk::kBlockThreads, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint8_t*>(mask.const_data_ptr()), static_cast<uint8_t*>(bits.mutable_data_ptr()), rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

at::Tensor unpack_bitmask_cuda(const at::Tensor& bits_in, int64_t cols) {
  pack_checks::check_unpack_bitmask(bits_in, cols);
  const c10::cuda::CUDAGuard guard(bits_in.device());
  const at::Tensor bits = bits_in.contiguous();
  const int64_t rows = bits.size(0);
  at::Tensor mask = at::empty({rows, cols}, bits.options().dtype(at::kBool));
  if (bits.numel() == 0) return mask;
  pk::unpack_bitmask_kernel<<<pk::blocks_for(bits.numel()), pk::kBlockThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint8_t*>(bits.const_data_ptr()), static_cast<uint8_t*>(mask.mutable_data_ptr()), rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace
}  // namespace barber

TORCH_LIBRARY_IMPL(barber, CUDA, m) {
  m.impl("pack_24", &barber::pack_24_cuda);
  m.impl("unpack_24", &barber::unpack_24_cuda);
  m.impl("pack_bitmask", &barber::pack_bitmask_cuda);
  m.impl("unpack_bitmask", &barber::unpack_bitmask_cuda);
}
