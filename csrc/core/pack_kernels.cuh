// CUDA kernels of the packing ops: pack_24, unpack_24, pack_bitmask, unpack_bitmask.
// Torch-free: plain nvcc compiles this (tests/cpp/compile_pack_kernels.cu); the torch
// glue (csrc/cuda/pack_ops.cu) checks inputs, allocates and launches. All index math
// and bit layouts come from csrc/core/pack24.h and bitmask.h, shared with the CPU ops.
//
// The non-template kernels are `static`: include this header in one translation unit.
// Requirements the glue guarantees: contiguous row-major buffers, base pointers aligned
// to 16 bytes (fresh allocations are), 2:4 shapes that passed the CUTLASS checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/bitmask.h"
#include "core/pack24.h"

namespace barber {
namespace pack_kernels {

// Threads per block of every kernel here: memory-bound element-wise work.
constexpr int kBlockThreads = 256;
// Cap on launched blocks; kernels use grid-stride loops beyond that.
constexpr int64_t kMaxBlocks = 65535;
// "No error" value of the error slot (a flat group index otherwise).
constexpr unsigned long long kNoError = ~0ull;

// Element type -> the bit pattern type pack24.h works on.
template <typename T>
struct BitsOf;
template <>
struct BitsOf<__half> {
  using type = uint16_t;
};
template <>
struct BitsOf<__nv_bfloat16> {
  using type = uint16_t;
};
template <>
struct BitsOf<int8_t> {
  using type = uint8_t;
};

// Blocks for `work` items, capped at kMaxBlocks (host helper for the glue).
inline unsigned int blocks_for(int64_t work) {
  const int64_t blocks = (work + kBlockThreads - 1) / kBlockThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// One meta word = 32 dense bytes (16 halves or 32 int8) = 2 x uint4, and 16 value bytes.
static_assert(pack24::word_cols<uint16_t>() * sizeof(uint16_t) == 2 * sizeof(uint4), "16-bit word size");
static_assert(pack24::word_cols<uint8_t>() * sizeof(uint8_t) == 2 * sizeof(uint4), "int8 word size");

// pack_24: one thread per meta word. dense [rows, cols] -> values [rows, cols/2],
// meta [rows, cols/word_cols] (reordered). A group with more than 2 nonzeros records
// its flat group index (row * cols/4 + group) with atomicMin into *first_bad, which
// the caller initialises to kNoError.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    pack24_kernel(const T* __restrict__ dense, T* __restrict__ values,
                  typename pack24::Elem<typename BitsOf<T>::type>::Meta* __restrict__ meta, int64_t rows,
                  int64_t cols, unsigned long long* __restrict__ first_bad) {
  using Bits = typename BitsOf<T>::type;
  using Meta = typename pack24::Elem<Bits>::Meta;
  constexpr int kWordCols = pack24::word_cols<Bits>();
  const int64_t ncols = cols / kWordCols;
  const int64_t words = rows * ncols;
  for (int64_t w = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; w < words; w += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = w / ncols;
    const int64_t col = w % ncols;
    // Element (row, col * kWordCols) sits at element offset w * kWordCols.
    union {
      uint4 v[2];
      Bits b[kWordCols];
    } in;
    const uint4* src = reinterpret_cast<const uint4*>(dense) + 2 * w;
    in.v[0] = src[0];
    in.v[1] = src[1];
    union {
      uint4 v;
      Bits b[kWordCols / 2];
    } out;
    Meta word;
    const int bad = pack24::pack_word<Bits>(in.b, out.b, &word);
    reinterpret_cast<uint4*>(values)[w] = out.v;
    meta[pack24::meta_offset<Bits>(row, col, rows)] = word;
    if (bad >= 0) {
      const unsigned long long group = static_cast<unsigned long long>(w * (kWordCols / 4) + bad);
      atomicMin(first_bad, group);
    }
  }
}

// unpack_24: one thread per meta word; inverse of pack24_kernel. An invalid group code
// records its flat group index into *first_bad (the dense output then holds zeros there).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    unpack24_kernel(const T* __restrict__ values,
                    const typename pack24::Elem<typename BitsOf<T>::type>::Meta* __restrict__ meta,
                    T* __restrict__ dense, int64_t rows, int64_t cols, unsigned long long* __restrict__ first_bad) {
  using Bits = typename BitsOf<T>::type;
  constexpr int kWordCols = pack24::word_cols<Bits>();
  const int64_t ncols = cols / kWordCols;
  const int64_t words = rows * ncols;
  for (int64_t w = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; w < words; w += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = w / ncols;
    const int64_t col = w % ncols;
    union {
      uint4 v;
      Bits b[kWordCols / 2];
    } in;
    in.v = reinterpret_cast<const uint4*>(values)[w];
    union {
      uint4 v[2];
      Bits b[kWordCols];
    } out;
    const int bad = pack24::unpack_word<Bits>(meta[pack24::meta_offset<Bits>(row, col, rows)], in.b, out.b);
    uint4* dst = reinterpret_cast<uint4*>(dense) + 2 * w;
    dst[0] = out.v[0];
    dst[1] = out.v[1];
    if (bad >= 0) {
      const unsigned long long group = static_cast<unsigned long long>(w * (kWordCols / 4) + bad);
      atomicMin(first_bad, group);
    }
  }
}

// pack_bitmask: one thread per output byte. mask [rows, cols] (bool bytes) ->
// bits [rows, ceil(cols/8)].
static __global__ void __launch_bounds__(kBlockThreads)
    pack_bitmask_kernel(const uint8_t* __restrict__ mask, uint8_t* __restrict__ bits, int64_t rows, int64_t cols) {
  const int64_t nbytes = bitmask::packed_cols(cols);
  const int64_t total = rows * nbytes;
  const bool aligned8 = cols % 8 == 0;  // then every 8-column chunk is an aligned uint64
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (aligned8) {
      bits[i] = bitmask::pack_word64(reinterpret_cast<const uint64_t*>(mask)[i]);
    } else {
      const int64_t row = i / nbytes;
      const int64_t b = i % nbytes;
      const int64_t rest = cols - 8 * b;
      bits[i] = bitmask::pack_byte(mask + row * cols + 8 * b, rest < 8 ? static_cast<int>(rest) : 8);
    }
  }
}

// unpack_bitmask: one thread per input byte. bits [rows, ceil(cols/8)] -> mask
// [rows, cols] as 0/1 bytes; padding bits are ignored.
static __global__ void __launch_bounds__(kBlockThreads)
    unpack_bitmask_kernel(const uint8_t* __restrict__ bits, uint8_t* __restrict__ mask, int64_t rows, int64_t cols) {
  const int64_t nbytes = bitmask::packed_cols(cols);
  const int64_t total = rows * nbytes;
  const bool aligned8 = cols % 8 == 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (aligned8) {
      reinterpret_cast<uint64_t*>(mask)[i] = bitmask::unpack_word64(bits[i]);
    } else {
      const int64_t row = i / nbytes;
      const int64_t b = i % nbytes;
      const int64_t rest = cols - 8 * b;
      bitmask::unpack_byte(bits[i], mask + row * cols + 8 * b, rest < 8 ? static_cast<int>(rest) : 8);
    }
  }
}

}  // namespace pack_kernels
}  // namespace barber
