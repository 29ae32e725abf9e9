// Bit-packed boolean masks: one bit per dense element, 8 columns per byte along each row.
// Torch-free and header-only (host and device).
//
// Layout (same as numpy.packbits(mask, axis=-1, bitorder="little") per row, and the
// `bitmask` tensor of compressed-tensors' sparse-24-bitmask format):
//   bits [rows, ceil(cols/8)] uint8; bit j (value 1 << j) of byte b is column 8*b + j.
//   Padding bits (columns >= cols in the last byte of a row) are written as zero and
//   ignored when unpacking.
// A mask byte counts as true when it is nonzero (torch.bool stores 0 or 1).
// The row helpers load and store 8 mask bytes as one 64-bit word: little-endian hosts
// (x86, ARM, and CUDA devices) only.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/macros.h"

namespace barber {
namespace bitmask {

// Bytes per packed row of `cols` columns.
BARBER_HOST_DEVICE constexpr int64_t packed_cols(int64_t cols) { return (cols + 7) / 8; }

// Packs mask[0..n) (n <= 8) into one byte, bit j = mask[j].
BARBER_HOST_DEVICE inline uint8_t pack_byte(const uint8_t* mask, int n) {
  unsigned byte = 0;
  for (int j = 0; j < n; ++j) byte |= unsigned(mask[j] != 0) << j;
  return static_cast<uint8_t>(byte);
}

// Packs 8 mask bytes loaded as one little-endian 64-bit word (byte j = column j), any
// nonzero byte counting as true. Branch-free: fold every byte to 0/1, then one multiply
// gathers bit 8j to bit 56+j (the partial products never overlap, so nothing carries).
BARBER_HOST_DEVICE inline uint8_t pack_word64(uint64_t eight) {
  uint64_t t = ((eight & 0xf0f0f0f0f0f0f0f0ull) >> 4) | (eight & 0x0f0f0f0f0f0f0f0full);
  t = ((t & 0x0c0c0c0c0c0c0c0cull) >> 2) | (t & 0x0303030303030303ull);
  t = ((t & 0x0202020202020202ull) >> 1) | (t & 0x0101010101010101ull);
  return static_cast<uint8_t>((t * 0x0102040810204080ull) >> 56);
}

// Unpacks the low n bits (n <= 8) of `byte` into mask[0..n) as 0/1.
BARBER_HOST_DEVICE inline void unpack_byte(uint8_t byte, uint8_t* mask, int n) {
  for (int j = 0; j < n; ++j) mask[j] = static_cast<uint8_t>((byte >> j) & 1u);
}

// The 8 unpacked 0/1 bytes of `byte` as one little-endian 64-bit word (byte j = bit j).
// Bits 0..6 are spread by one multiply (bit j lands on bit 8j), bit 7 is placed apart
// because its partial products would overlap bit 0's.
BARBER_HOST_DEVICE inline uint64_t unpack_word64(uint8_t byte) {
  const uint64_t low7 = (uint64_t(byte & 0x7fu) * 0x0002040810204081ull) & 0x0101010101010101ull;
  return low7 | (uint64_t(byte >> 7) << 56);
}

// Packs one row of `cols` mask bytes into packed_cols(cols) bytes (padding bits zero).
BARBER_HOST_DEVICE inline void pack_row(const uint8_t* mask, int64_t cols, uint8_t* bits) {
  const int64_t full = cols / 8;
  for (int64_t b = 0; b < full; ++b) {
    uint64_t eight;
    memcpy(&eight, mask + 8 * b, 8);  // one unaligned load; byte j = column j (little-endian)
    bits[b] = pack_word64(eight);
  }
  for (int64_t b = full; b < packed_cols(cols); ++b) {
    const int64_t rest = cols - 8 * b;
    bits[b] = pack_byte(mask + 8 * b, rest < 8 ? static_cast<int>(rest) : 8);
  }
}

// Unpacks one packed row into `cols` 0/1 bytes.
BARBER_HOST_DEVICE inline void unpack_row(const uint8_t* bits, int64_t cols, uint8_t* mask) {
  const int64_t full = cols / 8;
  for (int64_t b = 0; b < full; ++b) {
    const uint64_t eight = unpack_word64(bits[b]);
    memcpy(mask + 8 * b, &eight, 8);  // one unaligned store (little-endian)
  }
  for (int64_t b = full; b < packed_cols(cols); ++b) {
    const int64_t rest = cols - 8 * b;
    unpack_byte(bits[b], mask + 8 * b, rest < 8 ? static_cast<int>(rest) : 8);
  }
}

}  // namespace bitmask
}  // namespace barber
