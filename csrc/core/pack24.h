// The 2:4 packed layout of PyTorch's CUTLASS semi-structured path (sm80), as plain
// index math. Torch-free and header-only: compiled by g++ for the CPU ops and the
// gtests, and by nvcc for the CUDA kernels (csrc/core/pack_kernels.cuh).
//
// Ground truth: torch.sparse._semi_structured_conversions.
//   sparse_semi_structured_from_dense_cutlass / sparse_semi_structured_to_dense_cutlass.
// Our output is bit-identical to the former for float16, bfloat16 and int8, except that
// a group of 4 with more than 2 nonzeros is an error here (torch silently drops values).
//
// Dense W [rows, cols], cols split into groups of 4 consecutive columns:
//   values [rows, cols/2]  each group's 2 stored elements, ascending column order, row-major.
//   meta   [rows, cols/16] int16 words (16-bit elements) holding 4 groups, or
//          [rows, cols/32] int32 words (int8) holding 8 groups; group j of a word sits at
//          bits 4j..4j+3, then every word is moved to the CUTLASS position (meta_offset).
//
// Group code (4 bits): low 2 bits = position of the first stored element, high 2 bits =
// position of the second. "Nonzero" is `x != 0`: -0.0 counts as zero, NaN as nonzero.
// Groups with fewer than 2 nonzeros store explicit zeros (copied bit for bit, so a -0.0
// stays -0.0) at the positions torch's encoder picks:
//   kept {0,1}:0x4 {0,2}:0x8 {1,2}:0x9 {0,3}:0xC {1,3}:0xD {2,3}:0xE
//   none:0xE  {0}:0x8  {1}:0x9  {2}:0xE  {3}:0xE
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace barber {
namespace pack24 {

// Returned by group_code for a group that is not 2:4 (3 or 4 nonzeros).
constexpr int kTooManyNonzeros = -1;

// Element bit patterns: 16-bit floats (float16, bfloat16) are handled as uint16_t and
// int8 as uint8_t, so packing copies exact bits and never does float arithmetic.
template <typename Bits>
struct Elem;

template <>
struct Elem<uint16_t> {
  using Meta = uint16_t;                 // one int16 meta word ...
  static constexpr int kGroupsPerWord = 4;  // ... covers 4 groups = 16 dense columns
  static constexpr int kBand = 32;       // rows permuted within bands of 32 rows
  static constexpr int kInterweave = 4;
  static constexpr int kMinRows = 32;    // CUTLASS minimum (and multiple) for fp16/bf16
  static constexpr int kMinCols = 64;
  // x != 0 for IEEE halves: any bit other than the sign (so -0.0 is zero, NaN is not).
  BARBER_HOST_DEVICE static constexpr bool nonzero(uint16_t x) { return (x & 0x7fffu) != 0; }
};

template <>
struct Elem<uint8_t> {
  using Meta = uint32_t;                 // one int32 meta word covers 8 groups
  static constexpr int kGroupsPerWord = 8;
  static constexpr int kBand = 16;
  static constexpr int kInterweave = 2;
  static constexpr int kMinRows = 16;    // CUTLASS minimum (and multiple) for int8
  static constexpr int kMinCols = 128;
  BARBER_HOST_DEVICE static constexpr bool nonzero(uint8_t x) { return x != 0; }
};

// Dense columns covered by one meta word (16 for 16-bit elements, 32 for int8).
template <typename Bits>
BARBER_HOST_DEVICE constexpr int word_cols() {
  return 4 * Elem<Bits>::kGroupsPerWord;
}

// Group codes indexed by the 4-bit nonzero pattern p (bit j = element j is nonzero),
// one nibble per pattern: kCodeTable >> (4 * p) & 0xf. For patterns with at most 2
// nonzeros these are the codes of torch's Espresso-minimised encoder (which ignores m2),
// so the positions chosen for groups with 0 or 1 nonzeros match torch; patterns with
// 3 or 4 nonzeros (set in kTooManyMask) hold a placeholder 0x4. Held in registers: no
// memory table, so the same code runs on the GPU.
constexpr uint64_t kCodeTable = 0x444e4dce498e498eull;
constexpr uint32_t kTooManyMask = 0xe880u;  // patterns 7, 11, 13, 14, 15

// 4-bit code of a group from its nonzero pattern p, or kTooManyNonzeros.
BARBER_HOST_DEVICE inline int pattern_code(unsigned p) {
  if ((kTooManyMask >> p) & 1u) return kTooManyNonzeros;
  return static_cast<int>((kCodeTable >> (4 * p)) & 0xfu);
}

// The same from the four nonzero flags.
BARBER_HOST_DEVICE inline int group_code(bool m0, bool m1, bool m2, bool m3) {
  return pattern_code(unsigned(m0) | (unsigned(m1) << 1) | (unsigned(m2) << 2) | (unsigned(m3) << 3));
}

// Position (0..3) of the first / second stored element of a group code.
BARBER_HOST_DEVICE constexpr int code_first(int code) { return code & 3; }
BARBER_HOST_DEVICE constexpr int code_second(int code) { return (code >> 2) & 3; }
// A code unpack can honour: two distinct positions, first < second.
BARBER_HOST_DEVICE constexpr bool code_valid(int code) { return code_first(code) < code_second(code); }

// Linear index in the reordered meta tensor [rows, ncols] (viewed flat) of the logical
// word (row, col). This is CUTLASS reorder_meta + ColumnMajorInterleaved<2>, as in
// torch's _calculate_meta_reordering_scatter_offsets:
//   1. row permutation within bands: band base + (row % 8) * interweave + (row % band) / 8;
//   2. in each 2x2 tile of (row, col), top-right and bottom-left are swapped;
//   3. column-major storage with 2 columns interleaved: (c/2)*2*rows + 2*r + c%2.
// Needs rows % band == 0 and an even ncols; it is a bijection on [0, rows*ncols).
template <typename Bits>
BARBER_HOST_DEVICE inline int64_t meta_offset(int64_t row, int64_t col, int64_t rows) {
  constexpr int64_t band = Elem<Bits>::kBand;
  constexpr int64_t interweave = Elem<Bits>::kInterweave;
  int64_t r = row / band * band + (row % 8) * interweave + (row % band) / 8;
  int64_t c = col;
  if (r % 2 == 0 && c % 2 == 1) {
    ++r;
    --c;
  } else if (r % 2 == 1 && c % 2 == 0) {
    --r;
    ++c;
  }
  return (c / 2) * rows * 2 + r * 2 + (c % 2);
}

// Element i (0..3) of a group. On the GPU a chain of selects, so the group stays in
// registers (a runtime index would spill it to local memory); on the CPU an indexed load,
// which is branch-free where the select chain compiles to mispredicted branches.
template <typename Bits>
BARBER_HOST_DEVICE inline Bits select4(const Bits* x, int i) {
#ifdef __CUDA_ARCH__
  const Bits x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
  return i == 0 ? x0 : (i == 1 ? x1 : (i == 2 ? x2 : x3));
#else
  return x[i];
#endif
}

// Packs the word_cols<Bits>() dense elements of one meta word: writes half as many
// values and the (logical, not yet reordered) meta word. Returns the index (within the
// word) of the first group with more than 2 nonzeros, or -1 when all groups are 2:4.
template <typename Bits>
BARBER_HOST_DEVICE inline int pack_word(const Bits* dense, Bits* values, typename Elem<Bits>::Meta* word) {
  using E = Elem<Bits>;
  typename E::Meta w = 0;
  int bad = -1;
  for (int g = 0; g < E::kGroupsPerWord; ++g) {
    const Bits* x = dense + 4 * g;
    const unsigned p = unsigned(E::nonzero(x[0])) | (unsigned(E::nonzero(x[1])) << 1) |
                       (unsigned(E::nonzero(x[2])) << 2) | (unsigned(E::nonzero(x[3])) << 3);
    if (((kTooManyMask >> p) & 1u) && bad < 0) bad = g;  // report it; carry on with the placeholder
    const int code = static_cast<int>((kCodeTable >> (4 * p)) & 0xfu);
    values[2 * g] = select4(x, code_first(code));
    values[2 * g + 1] = select4(x, code_second(code));
    w |= static_cast<typename E::Meta>(static_cast<unsigned>(code) << (4 * g));
  }
  *word = w;
  return bad;
}

// Inverse of pack_word: writes word_cols<Bits>() dense elements, zero bits (+0.0) where
// nothing is stored. Returns the index of the first group whose code is invalid
// (first >= second), or -1.
template <typename Bits>
BARBER_HOST_DEVICE inline int unpack_word(typename Elem<Bits>::Meta word, const Bits* values, Bits* dense) {
  using E = Elem<Bits>;
  int bad = -1;
  for (int g = 0; g < E::kGroupsPerWord; ++g) {
    const int code = static_cast<int>((word >> (4 * g)) & 0xfu);
    const int first = code_first(code), second = code_second(code);
    const bool valid = code_valid(code);
    if (!valid && bad < 0) bad = g;
    Bits* x = dense + 4 * g;
#ifdef __CUDA_ARCH__
    // Selects keep the group in registers (see select4).
    const Bits v0 = values[2 * g], v1 = values[2 * g + 1];
    for (int j = 0; j < 4; ++j) x[j] = !valid ? Bits(0) : (j == first ? v0 : (j == second ? v1 : Bits(0)));
#else
    x[0] = x[1] = x[2] = x[3] = 0;  // an invalid group stays all zeros
    if (valid) {
      x[first] = values[2 * g];
      x[second] = values[2 * g + 1];
    }
#endif
  }
  return bad;
}

}  // namespace pack24
}  // namespace barber
