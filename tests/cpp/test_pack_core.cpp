// Unit tests of the torch-free packing core: csrc/core/pack24.h and csrc/core/bitmask.h.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

#include "core/bitmask.h"
#include "core/pack24.h"

namespace {

using barber::pack24::Elem;

// Nonzero patterns (bit j = column j of the group) with at most 2 nonzeros.
constexpr int kAllowed[11] = {0, 1, 2, 4, 8, 3, 5, 6, 9, 10, 12};

// The literal test matrix, also built by the generator in the comment of kMeta16:
// group g of row r has the nonzero pattern kAllowed[(r*7 + g*3) % 11]; nonzero elements
// are distinct positive values, zeros alternate +0.0 / -0.0 (16-bit) by (r + c) % 2.
uint16_t literal16(int r, int c) {
  const int pattern = kAllowed[(r * 7 + (c / 4) * 3) % 11];
  if ((pattern >> (c % 4)) & 1) return static_cast<uint16_t>(0x3C00 + (r * 64 + c) % 1024);
  return (r + c) % 2 ? 0x8000 : 0x0000;
}

uint8_t literal8(int r, int c) {
  const int pattern = kAllowed[(r * 7 + (c / 4) * 3) % 11];
  if ((pattern >> (c % 4)) & 1) return static_cast<uint8_t>((r * 5 + c) % 100 + 1);
  return 0;
}

// torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass
// (torch 2.13) of the 32x64 float16 literal (int16 meta as uint16 bits), row-major [32, 4].
const uint16_t kMeta16[32 * 4] = {
    0xd8ee, 0xe9e8, 0xe9e8, 0xec49, 0xec49, 0x8d8e, 0x8d8e, 0x9e9e, 0x49e9, 0x8eec, 0x8eec, 0x9e8d, 0x9e8d,
    0xc49e, 0xc49e, 0xd8ee, 0x8d8e, 0x9e9e, 0x9e9e, 0xeec4, 0xeec4, 0xe8d8, 0xe8d8, 0x49e9, 0xc49e, 0xd8ee,
    0xd8ee, 0xe9e8, 0xe9e8, 0xec49, 0xec49, 0x8d8e, 0xe8d8, 0x49e9, 0x49e9, 0x8eec, 0x8eec, 0x9e8d, 0x9e8d,
    0xc49e, 0xec49, 0x8d8e, 0x8d8e, 0x9e9e, 0x9e9e, 0xeec4, 0xeec4, 0xe8d8, 0x9e8d, 0xc49e, 0xc49e, 0xd8ee,
    0xd8ee, 0xe9e8, 0xe9e8, 0xec49, 0xeec4, 0xe8d8, 0xe8d8, 0x49e9, 0x49e9, 0x8eec, 0x8eec, 0x9e8d, 0xec49,
    0x8d8e, 0x8d8e, 0x9e9e, 0x9e9e, 0xeec4, 0xeec4, 0xe8d8, 0x9e8d, 0xc49e, 0xc49e, 0xd8ee, 0xd8ee, 0xe9e8,
    0xe9e8, 0xec49, 0xeec4, 0xe8d8, 0xe8d8, 0x49e9, 0x49e9, 0x8eec, 0x8eec, 0x9e8d, 0xe9e8, 0xec49, 0xec49,
    0x8d8e, 0x8d8e, 0x9e9e, 0x9e9e, 0xeec4, 0x8eec, 0x9e8d, 0x9e8d, 0xc49e, 0xc49e, 0xd8ee, 0xd8ee, 0xe9e8,
    0x9e9e, 0xeec4, 0xeec4, 0xe8d8, 0xe8d8, 0x49e9, 0x49e9, 0x8eec, 0xd8ee, 0xe9e8, 0xe9e8, 0xec49, 0xec49,
    0x8d8e, 0x8d8e, 0x9e9e, 0x49e9, 0x8eec, 0x8eec, 0x9e8d, 0x9e8d, 0xc49e, 0xc49e, 0xd8ee
};
// The same for the 16x128 int8 literal: int32 meta [16, 4].
const uint32_t kMeta32[16 * 4] = {
    0xe9e8d8eeu, 0xec49e9e8u, 0x8d8eec49u, 0x9e9e8d8eu, 0x8eec49e9u, 0x9e8d8eecu, 0xc49e9e8du, 0xd8eec49eu,
    0x9e9e8d8eu, 0xeec49e9eu, 0xe8d8eec4u, 0x49e9e8d8u, 0xd8eec49eu, 0xe9e8d8eeu, 0xec49e9e8u, 0x8d8eec49u,
    0x49e9e8d8u, 0x8eec49e9u, 0x9e8d8eecu, 0xc49e9e8du, 0x8d8eec49u, 0x9e9e8d8eu, 0xeec49e9eu, 0xe8d8eec4u,
    0xc49e9e8du, 0xd8eec49eu, 0xe9e8d8eeu, 0xec49e9e8u, 0xe8d8eec4u, 0x49e9e8d8u, 0x8eec49e9u, 0x9e8d8eecu,
    0xeec49e9eu, 0xe8d8eec4u, 0x49e9e8d8u, 0x8eec49e9u, 0xe9e8d8eeu, 0xec49e9e8u, 0x8d8eec49u, 0x9e9e8d8eu,
    0x8eec49e9u, 0x9e8d8eecu, 0xc49e9e8du, 0xd8eec49eu, 0x9e9e8d8eu, 0xeec49e9eu, 0xe8d8eec4u, 0x49e9e8d8u,
    0xd8eec49eu, 0xe9e8d8eeu, 0xec49e9e8u, 0x8d8eec49u, 0x49e9e8d8u, 0x8eec49e9u, 0x9e8d8eecu, 0xc49e9e8du,
    0x8d8eec49u, 0x9e9e8d8eu, 0xeec49e9eu, 0xe8d8eec4u, 0xc49e9e8du, 0xd8eec49eu, 0xe9e8d8eeu, 0xec49e9e8u
};

template <typename Bits>
void pack_matrix(const std::vector<Bits>& dense, int rows, int cols, std::vector<Bits>* values,
                 std::vector<typename Elem<Bits>::Meta>* meta) {
  constexpr int kWordCols = barber::pack24::word_cols<Bits>();
  const int ncols = cols / kWordCols;
  values->assign(rows * cols / 2, 0);
  meta->assign(rows * ncols, 0);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < ncols; ++c) {
      const int w = r * ncols + c;
      typename Elem<Bits>::Meta word;
      ASSERT_EQ(barber::pack24::pack_word<Bits>(dense.data() + w * kWordCols, values->data() + w * kWordCols / 2,
                                                &word),
                -1);
      (*meta)[barber::pack24::meta_offset<Bits>(r, c, rows)] = word;
    }
  }
}

template <typename Bits>
void unpack_matrix(const std::vector<Bits>& values, const std::vector<typename Elem<Bits>::Meta>& meta, int rows,
                   int cols, std::vector<Bits>* dense) {
  constexpr int kWordCols = barber::pack24::word_cols<Bits>();
  const int ncols = cols / kWordCols;
  dense->assign(rows * cols, 0x55);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < ncols; ++c) {
      const int w = r * ncols + c;
      ASSERT_EQ(barber::pack24::unpack_word<Bits>(meta[barber::pack24::meta_offset<Bits>(r, c, rows)],
                                                  values.data() + w * kWordCols / 2, dense->data() + w * kWordCols),
                -1);
    }
  }
}

// Logical (un-reordered) code of group g in row r, read back through meta_offset.
template <typename Bits>
int logical_code(const std::vector<typename Elem<Bits>::Meta>& meta, int rows, int r, int g) {
  constexpr int kGroups = Elem<Bits>::kGroupsPerWord;
  const auto word = meta[barber::pack24::meta_offset<Bits>(r, g / kGroups, rows)];
  return static_cast<int>((word >> (4 * (g % kGroups))) & 0xf);
}

TEST(Pack24Codes, TableOfAllSixteenPatterns) {
  // Expected code per nonzero pattern (bit j = column j), -1 = more than 2 nonzeros.
  // The two-nonzero codes are CUTLASS's; 0/1-nonzero groups follow torch's encoder.
  const int expected[16] = {0xE, 0x8, 0x9, 0x4, 0xE, 0x8, 0x9, -1, 0xE, 0xC, 0xD, -1, 0xE, -1, -1, -1};
  for (int p = 0; p < 16; ++p) {
    const int code = barber::pack24::group_code(p & 1, p & 2, p & 4, p & 8);
    EXPECT_EQ(code, expected[p]) << "pattern " << p;
    if (code < 0) continue;
    EXPECT_TRUE(barber::pack24::code_valid(code)) << "pattern " << p;
    // Every nonzero position is one of the two stored positions.
    for (int j = 0; j < 4; ++j) {
      if ((p >> j) & 1) {
        EXPECT_TRUE(barber::pack24::code_first(code) == j || barber::pack24::code_second(code) == j);
      }
    }
  }
}

// torch's encoder (sparse_semi_structured_from_dense_cutlass), boolean form.
int torch_espresso_code(bool m0, bool m1, bool m3) {
  const bool expr0 = m0 && m1, expr1 = !m0 && m1, expr2 = !m0 && !m1;
  const int first = int(expr1) | (int(expr2) << 1);
  const int second = int(expr0 || expr2 || m3) | (int(expr1 || !m1) << 1);
  return first | (second << 2);
}

TEST(Pack24Codes, TableIsTorchsEncoderForTwoFourPatterns) {
  for (unsigned p = 0; p < 16; ++p) {
    const int nonzeros = int(p & 1) + int((p >> 1) & 1) + int((p >> 2) & 1) + int((p >> 3) & 1);
    const int code = barber::pack24::pattern_code(p);
    if (nonzeros > 2) {
      EXPECT_EQ(code, barber::pack24::kTooManyNonzeros) << "pattern " << p;
    } else {
      EXPECT_EQ(code, torch_espresso_code(p & 1, p & 2, p & 8)) << "pattern " << p;
    }
  }
}

TEST(Pack24Codes, ValidCodesAreTheSixPairs) {
  std::set<int> valid;
  for (int code = 0; code < 16; ++code) {
    if (barber::pack24::code_valid(code)) valid.insert(code);
  }
  EXPECT_EQ(valid, (std::set<int>{0x4, 0x8, 0x9, 0xC, 0xD, 0xE}));
}

TEST(Pack24Word, TooManyNonzerosIsReported) {
  uint16_t dense[16] = {0};
  dense[4] = dense[5] = dense[7] = 0x3C00;  // group 1 has 3 nonzeros
  uint16_t values[8];
  uint16_t word;
  EXPECT_EQ(barber::pack24::pack_word<uint16_t>(dense, values, &word), 1);
  dense[7] = 0x8000;  // -0.0 counts as zero: now 2:4
  EXPECT_EQ(barber::pack24::pack_word<uint16_t>(dense, values, &word), -1);
}

TEST(Pack24Word, InvalidCodeIsReported) {
  const uint16_t values[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  uint16_t dense[16];
  EXPECT_EQ(barber::pack24::unpack_word<uint16_t>(0x44F4, values, dense), 1);  // group 1 code 0xF: 3, 3
  EXPECT_EQ(barber::pack24::unpack_word<uint16_t>(0x4E04, values, dense), 1);  // group 1 code 0x0
  EXPECT_EQ(barber::pack24::unpack_word<uint16_t>(0x4E94, values, dense), -1);
}

template <typename Bits>
void expect_bijection(int rows, int ncols) {
  std::vector<int> hits(rows * ncols, 0);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < ncols; ++c) {
      const int64_t off = barber::pack24::meta_offset<Bits>(r, c, rows);
      ASSERT_GE(off, 0);
      ASSERT_LT(off, rows * ncols);
      ++hits[off];
    }
  }
  for (int h : hits) EXPECT_EQ(h, 1);
}

TEST(Pack24Meta, OffsetIsABijection) {
  expect_bijection<uint16_t>(32, 4);
  expect_bijection<uint16_t>(96, 12);
  expect_bijection<uint8_t>(16, 4);
  expect_bijection<uint8_t>(48, 8);
}

TEST(Pack24Meta, FirstOffsets) {
  // Rows 0, 1 of a 32-row band go to reordered rows 0, 4 (interweave 4) and row 8 to
  // row 1; off-diagonal entries of each 2x2 (row, col) tile swap: (1, 0) -> (0, 1) and
  // (0, 1) -> (1, 0). Offset = (c/2)*2*rows + 2*r + c%2.
  EXPECT_EQ(barber::pack24::meta_offset<uint16_t>(0, 0, 32), 0);
  EXPECT_EQ(barber::pack24::meta_offset<uint16_t>(1, 0, 32), 2 * 4);
  EXPECT_EQ(barber::pack24::meta_offset<uint16_t>(8, 0, 32), 1);
  EXPECT_EQ(barber::pack24::meta_offset<uint16_t>(0, 1, 32), 2 * 1);
}

template <typename Bits, typename Literal>
void check_literal(int rows, int cols, Literal literal, const typename Elem<Bits>::Meta* expected_meta) {
  std::vector<Bits> dense(rows * cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) dense[r * cols + c] = literal(r, c);
  }
  std::vector<Bits> values;
  std::vector<typename Elem<Bits>::Meta> meta;
  pack_matrix<Bits>(dense, rows, cols, &values, &meta);
  for (size_t i = 0; i < meta.size(); ++i) EXPECT_EQ(meta[i], expected_meta[i]) << "meta word " << i;
  std::vector<Bits> back;
  unpack_matrix<Bits>(values, meta, rows, cols, &back);
  for (int r = 0; r < rows; ++r) {
    for (int g = 0; g < cols / 4; ++g) {
      const int code = logical_code<Bits>(meta, rows, r, g);
      for (int j = 0; j < 4; ++j) {
        const int c = 4 * g + j;
        const bool stored = barber::pack24::code_first(code) == j || barber::pack24::code_second(code) == j;
        // Stored positions keep their exact bits (also -0.0); the others come back as +0.
        EXPECT_EQ(back[r * cols + c], stored ? dense[r * cols + c] : Bits(0)) << "row " << r << " col " << c;
      }
      EXPECT_EQ(values[r * cols / 2 + 2 * g], dense[r * cols + 4 * g + barber::pack24::code_first(code)]);
      EXPECT_EQ(values[r * cols / 2 + 2 * g + 1], dense[r * cols + 4 * g + barber::pack24::code_second(code)]);
    }
  }
}

TEST(Pack24Literal, Float16Of32x64MatchesTorch) { check_literal<uint16_t>(32, 64, literal16, kMeta16); }

TEST(Pack24Literal, Int8Of16x128MatchesTorch) { check_literal<uint8_t>(16, 128, literal8, kMeta32); }

TEST(Bitmask, WordHelpersMatchTheByteLoops) {
  for (int byte = 0; byte < 256; ++byte) {
    uint8_t mask[8];
    barber::bitmask::unpack_byte(static_cast<uint8_t>(byte), mask, 8);
    uint64_t word = 0;
    for (int j = 0; j < 8; ++j) word |= uint64_t(mask[j]) << (8 * j);
    EXPECT_EQ(barber::bitmask::unpack_word64(static_cast<uint8_t>(byte)), word);
    EXPECT_EQ(barber::bitmask::pack_word64(word), byte);
    EXPECT_EQ(barber::bitmask::pack_byte(mask, 8), byte);
    // Any nonzero byte value counts as true.
    EXPECT_EQ(barber::bitmask::pack_word64(word * 0xFF), byte);
  }
}

TEST(Bitmask, RowRoundTripAndPadding) {
  for (int cols : {0, 1, 7, 8, 9, 16, 37, 64, 129}) {
    std::vector<uint8_t> mask(cols);
    for (int c = 0; c < cols; ++c) mask[c] = static_cast<uint8_t>((c * 7 + cols) % 3 == 0);
    std::vector<uint8_t> bits(barber::bitmask::packed_cols(cols), 0xAA);
    barber::bitmask::pack_row(mask.data(), cols, bits.data());
    for (int c = 0; c < cols; ++c) EXPECT_EQ((bits[c / 8] >> (c % 8)) & 1, mask[c]) << "cols " << cols;
    if (cols % 8) {
      EXPECT_EQ(bits.back() >> (cols % 8), 0) << "padding bits of cols " << cols;
    }
    std::vector<uint8_t> back(cols, 0x55);
    barber::bitmask::unpack_row(bits.data(), cols, back.data());
    EXPECT_EQ(back, mask) << "cols " << cols;
  }
}

TEST(Bitmask, LittleEndianBitOrder) {
  const uint8_t mask[10] = {1, 0, 0, 0, 0, 0, 0, 1, 0, 1};
  uint8_t bits[2];
  barber::bitmask::pack_row(mask, 10, bits);
  EXPECT_EQ(bits[0], 0x81);  // columns 0 and 7
  EXPECT_EQ(bits[1], 0x02);  // column 9
}

}  // namespace
