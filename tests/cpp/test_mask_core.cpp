// Unit tests of the torch-free selection core: csrc/core/order.h, topk_row.h, nm_mask.h,
// rebuild.h. Literal hand-checked cases, exhaustive key-order checks of the 16-bit formats,
// and random rows (with heavy ties) against brute-force sort-based implementations of the
// spec (docs/algorithm.md §1.1-§1.3, §4.4, §4.6).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/nm_mask.h"
#include "core/order.h"
#include "core/rebuild.h"
#include "core/topk_row.h"

namespace {

using barber::core::Bf16;
using barber::core::Fp16;
using barber::core::Fp32;
namespace core = barber::core;

uint32_t f32_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

float f32_from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// IEEE half -> float (exact), for the exhaustive float16 test.
float half_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(mant + 1024), exp - 25);
  }
  return sign ? -v : v;
}

std::vector<uint32_t> f32_row(const std::vector<float>& xs) {
  std::vector<uint32_t> b;
  for (float x : xs) b.push_back(f32_bits(x));
  return b;
}

std::vector<uint8_t> bytes(std::initializer_list<int> xs) { return std::vector<uint8_t>(xs.begin(), xs.end()); }

// --- brute-force references --------------------------------------------------------------

// Columns of row in the total order (best first).
template <class F>
std::vector<int64_t> total_order(const std::vector<typename F::Bits>& row) {
  std::vector<int64_t> idx(row.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return core::ranks_before(core::order_key<F>(row[a]), a, core::order_key<F>(row[b]), b);
  });
  return idx;
}

template <class F>
std::vector<uint8_t> brute_topk(const std::vector<typename F::Bits>& row, int64_t k) {
  std::vector<uint8_t> out(row.size(), 0);
  const auto order = total_order<F>(row);
  for (int64_t i = 0; i < k; ++i) out[order[i]] = 1;
  return out;
}

float value_of(uint32_t b) { return f32_from_bits(b); }
float value_of(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }  // bf16 rows only

// The spec, literally: sort P best-first and K worst-first, count strict pairs, swap.
template <class F>
std::vector<uint8_t> brute_rebuild(const std::vector<typename F::Bits>& row, const std::vector<uint8_t>& mask,
                                   double ratio, int64_t* beneficial = nullptr) {
  const auto order = total_order<F>(row);
  std::vector<int64_t> pruned, kept;  // P best-first; K collected best-first, then reversed
  for (int64_t i : order) (mask[i] ? kept : pruned).push_back(i);
  std::reverse(kept.begin(), kept.end());
  int64_t r = 0;
  for (size_t i = 0; i < std::min(pruned.size(), kept.size()); ++i) {
    if (value_of(row[pruned[i]]) > value_of(row[kept[i]])) ++r;
  }
  if (beneficial) *beneficial = r;
  const int64_t s = static_cast<int64_t>(std::floor(ratio * static_cast<double>(r)));
  std::vector<uint8_t> out(mask);
  for (int64_t i = 0; i < s; ++i) {
    out[pruned[i]] = 1;
    out[kept[i]] = 0;
  }
  return out;
}

template <class F>
std::vector<uint8_t> run_topk(const std::vector<typename F::Bits>& row, int64_t k, int* err = nullptr) {
  core::TopkRow<F> sel(static_cast<int64_t>(row.size()));
  std::vector<uint8_t> out(row.size(), 7);
  const int e = sel.run(row.data(), static_cast<int64_t>(row.size()), k, out.data());
  if (err) *err = e;
  return out;
}

template <class F>
std::vector<uint8_t> run_rebuild(const std::vector<typename F::Bits>& row, const std::vector<uint8_t>& mask,
                                 double ratio, int64_t m = 0, int* err = nullptr, int64_t* beneficial = nullptr) {
  core::RebuildRow<F> rb(static_cast<int64_t>(row.size()));
  std::vector<uint8_t> out(row.size(), 7);
  int64_t group_kept = 0;
  for (int64_t j = 0; j < m; ++j) group_kept += mask[j];
  const int e = rb.run(row.data(), mask.data(), static_cast<int64_t>(row.size()), ratio, m, group_kept, out.data());
  if (err) *err = e;
  if (beneficial) *beneficial = rb.beneficial();
  return out;
}

// --- order.h -----------------------------------------------------------------------------

TEST(Order, Fp32KeysFollowTheFloatOrder) {
  const float inf = std::numeric_limits<float>::infinity();
  const float denorm = std::numeric_limits<float>::denorm_min();
  const std::vector<float> ascending = {-inf,   -3.4e38f, -1.0f, -1e-30f, -denorm, 0.0f,
                                        denorm, 1e-30f,   1.0f,  3.4e38f, inf};
  for (size_t i = 1; i < ascending.size(); ++i) {
    EXPECT_LT(core::order_key<Fp32>(f32_bits(ascending[i - 1])), core::order_key<Fp32>(f32_bits(ascending[i])))
        << ascending[i - 1] << " vs " << ascending[i];
    EXPECT_LT(core::signed_order_key<Fp32>(f32_bits(ascending[i - 1])),
              core::signed_order_key<Fp32>(f32_bits(ascending[i])));
  }
  EXPECT_EQ(core::order_key<Fp32>(f32_bits(-0.0f)), core::order_key<Fp32>(f32_bits(0.0f)));
}

TEST(Order, NanDetection) {
  for (uint32_t b : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFFFFFFFFu}) EXPECT_TRUE(core::is_nan<Fp32>(b)) << b;
  for (uint32_t b : {0x7F800000u, 0xFF800000u, 0x00000000u, 0x80000000u, 0x7F7FFFFFu}) {
    EXPECT_FALSE(core::is_nan<Fp32>(b)) << b;
  }
  for (uint16_t b : {0x7E00, 0x7C01, 0xFE00, 0xFFFF}) EXPECT_TRUE(core::is_nan<Fp16>(b)) << b;
  for (uint16_t b : {0x7C00, 0xFC00, 0x7BFF, 0x8000}) EXPECT_FALSE(core::is_nan<Fp16>(b)) << b;
  for (uint16_t b : {0x7FC0, 0x7F81, 0xFFC0}) EXPECT_TRUE(core::is_nan<Bf16>(b)) << b;
  for (uint16_t b : {0x7F80, 0xFF80, 0x7F7F, 0x8000}) EXPECT_FALSE(core::is_nan<Bf16>(b)) << b;
}

// Every non-NaN 16-bit pattern: key order == value order, equal keys <=> equal values.
template <class F, class ToFloat>
void check_all_16bit_keys(ToFloat to_float) {
  std::vector<uint16_t> patterns;
  for (uint32_t b = 0; b < 65536; ++b) {
    if (!core::is_nan<F>(static_cast<uint16_t>(b))) patterns.push_back(static_cast<uint16_t>(b));
  }
  std::sort(patterns.begin(), patterns.end(), [&](uint16_t a, uint16_t b) { return to_float(a) < to_float(b); });
  for (size_t i = 1; i < patterns.size(); ++i) {
    const float a = to_float(patterns[i - 1]), b = to_float(patterns[i]);
    const auto ka = core::order_key<F>(patterns[i - 1]), kb = core::order_key<F>(patterns[i]);
    if (a == b) {
      EXPECT_EQ(ka, kb) << patterns[i - 1] << " " << patterns[i];
    } else {
      EXPECT_LT(ka, kb) << patterns[i - 1] << " " << patterns[i];
    }
  }
}

TEST(Order, AllFp16KeysFollowTheValueOrder) { check_all_16bit_keys<Fp16>(half_to_float); }
TEST(Order, AllBf16KeysFollowTheValueOrder) {
  check_all_16bit_keys<Bf16>([](uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); });
}

TEST(Order, RanksBeforeBreaksTiesByLowerColumn) {
  EXPECT_TRUE(core::ranks_before(5u, 3, 4u, 0));
  EXPECT_TRUE(core::ranks_before(5u, 0, 5u, 3));
  EXPECT_FALSE(core::ranks_before(5u, 3, 5u, 0));
  EXPECT_TRUE(core::ranks_after(5u, 3, 5u, 0));
  EXPECT_TRUE(core::ranks_after(4u, 0, 5u, 3));
}

// --- topk_row.h --------------------------------------------------------------------------

TEST(Buckets, TopAndBottom) {
  uint32_t h[256] = {};
  h[10] = 3;
  h[200] = 2;
  h[255] = 1;
  uint32_t above = 0, below = 0;
  EXPECT_EQ(core::top_bucket(h, 1, &above), 255);
  EXPECT_EQ(above, 0u);
  EXPECT_EQ(core::top_bucket(h, 3, &above), 200);
  EXPECT_EQ(above, 1u);
  EXPECT_EQ(core::top_bucket(h, 4, &above), 10);
  EXPECT_EQ(above, 3u);
  EXPECT_EQ(core::bottom_bucket(h, 3, &below), 10);
  EXPECT_EQ(below, 0u);
  EXPECT_EQ(core::bottom_bucket(h, 6, &below), 255);
  EXPECT_EQ(below, 5u);
}

TEST(TopkRow, LiteralRows) {
  EXPECT_EQ(run_topk<Fp32>(f32_row({3, 1, 2, 3, 0}), 2), bytes({1, 0, 0, 1, 0}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({3, 1, 2, 3, 0}), 3), bytes({1, 0, 1, 1, 0}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({1, 1, 1, 1}), 2), bytes({1, 1, 0, 0}));            // ties: lower column
  EXPECT_EQ(run_topk<Fp32>(f32_row({-0.0f, 0.0f, -1}), 1), bytes({1, 0, 0}));          // -0.0 == +0.0
  EXPECT_EQ(run_topk<Fp32>(f32_row({0.0f, -0.0f, -1}), 1), bytes({1, 0, 0}));
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(run_topk<Fp32>(f32_row({-inf, inf, 1, inf}), 1), bytes({0, 1, 0, 0}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({-inf, inf, 1, inf}), 3), bytes({0, 1, 1, 1}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({-inf, -inf, -inf}), 2), bytes({1, 1, 0}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({2, 1}), 0), bytes({0, 0}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({2, 1}), 2), bytes({1, 1}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({}), 0), bytes({}));
  EXPECT_EQ(run_topk<Fp32>(f32_row({5}), 1), bytes({1}));
  // bfloat16 1.0 = 0x3F80, 2.0 = 0x4000, -1.0 = 0xBF80
  EXPECT_EQ(run_topk<Bf16>({0x3F80, 0xBF80, 0x4000, 0x3F80}, 2), bytes({1, 0, 1, 0}));
  // float16 1.0 = 0x3C00, -0.0 = 0x8000, 0.0 = 0x0000
  EXPECT_EQ(run_topk<Fp16>({0x8000, 0x0000, 0x3C00}, 2), bytes({1, 0, 1}));
}

TEST(TopkRow, NanIsReported) {
  int err = 0;
  run_topk<Fp32>(f32_row({1, std::nanf(""), 2}), 1, &err);
  EXPECT_EQ(err, core::kErrorNaN);
  run_topk<Fp32>(f32_row({1, std::nanf(""), 2}), 0, &err);  // k = 0 still checks
  EXPECT_EQ(err, core::kErrorNaN);
  run_topk<Bf16>({0x3F80, 0x7FC0}, 2, &err);
  EXPECT_EQ(err, core::kErrorNaN);
  run_topk<Fp16>({0x3C00, 0x7E00}, 1, &err);
  EXPECT_EQ(err, core::kErrorNaN);
  run_topk<Fp32>(f32_row({1, 2}), 1, &err);
  EXPECT_EQ(err, 0);
}

// Random rows of several kinds against the brute force, with one scratch reused across rows
// (checks that the histograms are left all-zero after every row, NaN rows included).
TEST(TopkRow, RandomRowsMatchBruteForce) {
  std::mt19937 gen(1);
  core::TopkRow<Fp32> sel32(5000);
  core::TopkRow<Bf16> sel16(5000);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t n = std::uniform_int_distribution<int64_t>(1, 5000)(gen);
    const int kind = trial % 5;
    std::vector<uint32_t> row(n);
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int> small(-3, 3);
    for (auto& b : row) {
      float x = 0;
      if (kind == 0) x = normal(gen);
      if (kind == 1) x = static_cast<float>(small(gen));                   // heavy ties
      if (kind == 2) x = 1.0f + 1e-6f * static_cast<float>(small(gen) + 3);  // one high-16-bit bucket
      if (kind == 3) x = 0.0f;                                               // all equal
      if (kind == 4) x = std::ldexp(normal(gen), small(gen) * 40);           // wide exponents, +-inf
      b = f32_bits(x);
    }
    const int64_t k = std::uniform_int_distribution<int64_t>(0, n)(gen);
    std::vector<uint8_t> out(n);
    ASSERT_EQ(sel32.run(row.data(), n, k, out.data()), 0);
    ASSERT_EQ(out, brute_topk<Fp32>(row, k)) << "trial " << trial << " n=" << n << " k=" << k;
    std::vector<uint16_t> row16(n);
    for (int64_t i = 0; i < n; ++i) row16[i] = static_cast<uint16_t>(row[i] >> 16);
    ASSERT_EQ(sel16.run(row16.data(), n, k, out.data()), 0);
    ASSERT_EQ(out, brute_topk<Bf16>(row16, k)) << "bf16 trial " << trial;
    if (trial % 50 == 0) {  // a NaN row in between must not leave counts behind
      std::vector<uint32_t> bad(row);
      bad[n / 2] = 0x7FC00000u;
      EXPECT_EQ(sel32.run(bad.data(), n, std::max<int64_t>(k, 1), out.data()), core::kErrorNaN);
    }
  }
}

// --- nm_mask.h ---------------------------------------------------------------------------

TEST(NmMask, LiteralGroups) {
  const auto row = f32_row({4, 3, 2, 1, 1, 2, 3, 4, 1, 1, 1, 1, -0.0f, 0.0f, 5, -5});
  std::vector<uint8_t> out(row.size());
  ASSERT_EQ((core::nm_groups<Fp32, 4>(row.data(), 4, 4, 2, out.data())), 0);
  EXPECT_EQ(out, bytes({1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 0, 1, 0}));
  ASSERT_EQ((core::nm_groups<Fp32>(row.data(), 4, 4, 2, out.data())), 0);  // runtime m
  EXPECT_EQ(out, bytes({1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 0, 1, 0}));
  ASSERT_EQ((core::nm_groups<Fp32, 4>(row.data(), 4, 4, 0, out.data())), 0);
  EXPECT_EQ(out, std::vector<uint8_t>(16, 0));
  ASSERT_EQ((core::nm_groups<Fp32, 4>(row.data(), 4, 4, 4, out.data())), 0);
  EXPECT_EQ(out, std::vector<uint8_t>(16, 1));
  ASSERT_EQ((core::nm_groups<Fp32, 8>(row.data(), 2, 8, 4, out.data())), 0);
  EXPECT_EQ(out, bytes({1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0}));
  // 3:7 over one group (runtime m)
  const auto row7 = f32_row({0, 6, 1, 5, 2, 4, 3});
  std::vector<uint8_t> out7(7);
  ASSERT_EQ((core::nm_groups<Fp32>(row7.data(), 1, 7, 3, out7.data())), 0);
  EXPECT_EQ(out7, bytes({0, 1, 0, 1, 0, 1, 0}));
}

TEST(NmMask, NanIsReported) {
  auto row = f32_row({1, 2, 3, 4, 5, 6, 7, std::nanf("")});
  std::vector<uint8_t> out(row.size());
  EXPECT_EQ((core::nm_groups<Fp32, 4>(row.data(), 2, 4, 2, out.data())), core::kErrorNaN);
  EXPECT_EQ((core::nm_groups<Fp32>(row.data(), 2, 4, 2, out.data())), core::kErrorNaN);
  const std::vector<uint16_t> row16 = {0x3C00, 0x7E00, 0, 0};
  EXPECT_EQ((core::nm_groups<Fp16, 4>(row16.data(), 1, 4, 2, out.data())), core::kErrorNaN);
}

TEST(NmMask, RandomGroupsMatchBruteForce) {
  std::mt19937 gen(2);
  std::uniform_int_distribution<int> small(-2, 2);
  for (int m : {1, 2, 3, 4, 5, 8, 16, 32}) {
    for (int n = 0; n <= m; ++n) {
      const int64_t groups = 37;
      std::vector<uint16_t> row(groups * m);
      for (auto& b : row) b = static_cast<uint16_t>(f32_bits(static_cast<float>(small(gen))) >> 16);
      std::vector<uint8_t> out(row.size()), fixed(row.size());
      ASSERT_EQ(core::nm_groups<Bf16>(row.data(), groups, m, n, out.data()), 0);
      if (m == 4) {
        ASSERT_EQ((core::nm_groups<Bf16, 4>(row.data(), groups, m, n, fixed.data())), 0);
        EXPECT_EQ(fixed, out);
      }
      if (m == 8) {
        ASSERT_EQ((core::nm_groups<Bf16, 8>(row.data(), groups, m, n, fixed.data())), 0);
        EXPECT_EQ(fixed, out);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const std::vector<uint16_t> group(row.begin() + g * m, row.begin() + (g + 1) * m);
        const std::vector<uint8_t> got(out.begin() + g * m, out.begin() + (g + 1) * m);
        ASSERT_EQ(got, brute_topk<Bf16>(group, n)) << "m=" << m << " n=" << n << " g=" << g;
      }
    }
  }
}

// --- rebuild.h ---------------------------------------------------------------------------

TEST(Rebuild, SwapCountIsFloorInDouble) {
  EXPECT_EQ(core::swap_count(0.5, 3), 1);
  EXPECT_EQ(core::swap_count(1.0, 7), 7);
  EXPECT_EQ(core::swap_count(0.0, 7), 0);
  EXPECT_EQ(core::swap_count(0.1, 10), 1);   // 0.1 * 10 rounds to exactly 1.0
  EXPECT_EQ(core::swap_count(0.29, 100), 28);  // 0.29 * 100 = 28.999999999999996
}

TEST(Rebuild, CrossingBucket) {
  // P = {5, 3, 1}, K = {4, 2, 0} (one digit): a = 5,3,1; b = 0,2,4 -> R = 2.
  uint32_t hp[256] = {}, hk[256] = {};
  hp[5] = hp[3] = hp[1] = 1;
  hk[4] = hk[2] = hk[0] = 1;
  uint64_t p_above = 0, k_below = 0;
  const int t = core::crossing_bucket(hp, hk, &p_above, &k_below);
  EXPECT_EQ(t, 2);  // B(2) = 2 >= A(2) = 2; B(1) = 1 < A(1) = 2
  EXPECT_EQ(std::max(p_above, k_below), 2u);
}

TEST(Rebuild, LiteralRows) {
  const auto row = f32_row({5, 4, 3, 2, 1, 0});
  const auto mask = bytes({0, 1, 0, 1, 0, 1});  // P = 5, 3, 1; K worst-first = 0, 2, 4: R = 2
  int64_t r = 0;
  EXPECT_EQ(run_rebuild<Fp32>(row, mask, 1.0, 0, nullptr, &r), bytes({1, 1, 1, 0, 0, 0}));
  EXPECT_EQ(r, 2);
  EXPECT_EQ(run_rebuild<Fp32>(row, mask, 0.5), bytes({1, 1, 0, 1, 0, 0}));
  EXPECT_EQ(run_rebuild<Fp32>(row, mask, 0.49), mask);  // floor(0.98) = 0
  EXPECT_EQ(run_rebuild<Fp32>(row, mask, 0.0), mask);
  // Equal scores are never beneficial (strict), whatever their columns.
  EXPECT_EQ(run_rebuild<Fp32>(f32_row({1, 1, 1, 1}), bytes({0, 0, 1, 1}), 1.0), bytes({0, 0, 1, 1}));
  // Ties at the thresholds: P = {2@0, 2@2}, K = {1@1, 1@3}; R = 2, s = 1: regrow column 0
  // (lower column first), prune column 3 (higher column is worse).
  EXPECT_EQ(run_rebuild<Fp32>(f32_row({2, 1, 2, 1}), bytes({0, 1, 0, 1}), 0.5), bytes({1, 1, 0, 0}));
  // -0.0 == +0.0: not beneficial.
  EXPECT_EQ(run_rebuild<Fp32>(f32_row({0.0f, -0.0f}), bytes({0, 1}), 1.0), bytes({0, 1}));
  // All kept / all pruned: unchanged.
  EXPECT_EQ(run_rebuild<Fp32>(f32_row({1, 2}), bytes({1, 1}), 1.0), bytes({1, 1}));
  EXPECT_EQ(run_rebuild<Fp32>(f32_row({1, 2}), bytes({0, 0}), 1.0), bytes({0, 0}));
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(run_rebuild<Fp32>(f32_row({inf, -inf}), bytes({0, 1}), 1.0), bytes({1, 0}));
}

TEST(Rebuild, NmLiteral) {
  // Groups of 4; P best-first 8@4, 7@5, 4@3, 2@1; K worst-first 1@0, 3@2, 5@7, 6@6: R = 2.
  const auto row = f32_row({1, 2, 3, 4, 8, 7, 6, 5});
  const auto mask = bytes({1, 0, 1, 0, 0, 0, 1, 1});
  int err = -1;
  // ratio 1: s = 2, both regrown in group 1, which drops its two previously kept.
  EXPECT_EQ(run_rebuild<Fp32>(row, mask, 1.0, 4, &err), bytes({1, 0, 1, 0, 1, 1, 0, 0}));
  EXPECT_EQ(err, 0);
  // ratio 0.5: s = 1, column 4 regrows, group 1 drops its worst kept (5@7).
  EXPECT_EQ(run_rebuild<Fp32>(row, mask, 0.5, 4, &err), bytes({1, 0, 1, 0, 1, 0, 1, 0}));
  // One group of 8 = the whole row: drops the two worst kept of the row (1@0, 3@2).
  EXPECT_EQ(run_rebuild<Fp32>(row, mask, 1.0, 8, &err), bytes({0, 0, 0, 0, 1, 1, 1, 1}));
}

// With one group spanning the row, the N:M rebuild is the unstructured one (both the
// O(m^2) group path, m <= kNmMaxGroup, and the sort path for wider groups).
TEST(Rebuild, OneGroupEqualsUnstructured) {
  std::mt19937 gen(6);
  std::uniform_int_distribution<int> small(-4, 4);
  for (int64_t n : {16, 32, 33, 64, 300}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<uint32_t> row(n);
      for (auto& b : row) b = f32_bits(static_cast<float>(small(gen)));
      std::vector<uint8_t> mask(n);
      for (auto& v : mask) v = std::uniform_int_distribution<int>(0, 1)(gen);
      for (double ratio : {0.5, 1.0}) {
        int err = -1;
        const auto grouped = run_rebuild<Fp32>(row, mask, ratio, n, &err);
        ASSERT_EQ(err, 0);
        ASSERT_EQ(grouped, run_rebuild<Fp32>(row, mask, ratio)) << "n=" << n << " trial " << trial;
      }
    }
  }
}

TEST(Rebuild, NmErrors) {
  int err = 0;
  // Groups keep 2 and 1 entries: not an N:M mask.
  run_rebuild<Fp32>(f32_row({1, 2, 3, 4, 5, 6, 7, 8}), bytes({1, 1, 0, 0, 1, 0, 0, 0}), 0.5, 4, &err);
  EXPECT_EQ(err, core::kErrorNmMask);
  // 1:4, group 0 regrows 2 entries but kept only 1.
  run_rebuild<Fp32>(f32_row({0, 9, 8, 0.5f, 1, 0.1f, 0.2f, 0.3f}), bytes({1, 0, 0, 0, 1, 0, 0, 0}), 1.0, 4, &err);
  EXPECT_EQ(err, core::kErrorNmOverflow);
  run_rebuild<Fp32>(f32_row({0, 9, 8, 0.5f, 1, 0.1f, 0.2f, 0.3f}), bytes({1, 0, 0, 0, 1, 0, 0, 0}), 0.5, 4, &err);
  EXPECT_EQ(err, 0);  // s = 1 fits
  run_rebuild<Fp32>(f32_row({0, std::nanf(""), 8, 0.5f}), bytes({1, 0, 0, 0}), 0.0, 4, &err);
  EXPECT_EQ(err, core::kErrorNaN);  // checked even when ratio = 0
}

TEST(Rebuild, NmFixupGroup) {
  const uint32_t keys[4] = {10, 20, 30, 40};
  uint8_t state[4] = {core::kStateKept, core::kStateRegrown, core::kStateKept, core::kStatePruned};
  ASSERT_TRUE(core::nm_fixup_group(keys, state, 4));
  EXPECT_EQ(std::vector<uint8_t>(state, state + 4), bytes({0, 1, 1, 0}));  // drops the worst kept (10@0)
  const uint32_t tied[4] = {7, 7, 7, 7};
  uint8_t st2[4] = {core::kStateKept, core::kStateKept, core::kStateRegrown, core::kStatePruned};
  ASSERT_TRUE(core::nm_fixup_group(tied, st2, 4));
  EXPECT_EQ(std::vector<uint8_t>(st2, st2 + 4), bytes({1, 0, 1, 0}));  // among ties the higher column is worse
  uint8_t st3[4] = {core::kStateKept, core::kStateRegrown, core::kStateRegrown, core::kStatePruned};
  EXPECT_FALSE(core::nm_fixup_group(keys, st3, 4));
}

// Random rows against the literal spec; invariants: kept count, no beneficial pair at ratio 1.
template <class F>
void random_rebuilds(uint32_t seed) {
  std::mt19937 gen(seed);
  for (int trial = 0; trial < 250; ++trial) {
    const int64_t n = std::uniform_int_distribution<int64_t>(1, 3000)(gen);
    const int kind = trial % 4;
    std::vector<typename F::Bits> row(n);
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int> small(-3, 3);
    for (auto& b : row) {
      float x = kind == 0 ? normal(gen)
                : kind == 1 ? static_cast<float>(small(gen))
                : kind == 2 ? 1.0f + 1e-6f * static_cast<float>(small(gen) + 3)
                            : std::ldexp(normal(gen), small(gen) * 40);
      const uint32_t bits = f32_bits(x);
      b = static_cast<typename F::Bits>(sizeof(b) == 4 ? bits : bits >> 16);
    }
    const double frac = std::uniform_real_distribution<double>(0, 1)(gen);
    std::vector<uint8_t> mask(n);
    for (auto& v : mask) v = std::uniform_real_distribution<double>(0, 1)(gen) < frac;
    for (double ratio : {0.0, 0.01, 0.3, 0.5, 1.0}) {
      int err = -1;
      int64_t r = -1, r_brute = -2;
      const auto got = run_rebuild<F>(row, mask, ratio, 0, &err, &r);
      const auto want = brute_rebuild<F>(row, mask, ratio, &r_brute);
      ASSERT_EQ(err, 0);
      ASSERT_EQ(got, want) << "trial " << trial << " n=" << n << " ratio=" << ratio;
      if (ratio > 0) {
        ASSERT_EQ(r, r_brute) << "trial " << trial;
      }
      ASSERT_EQ(std::count(got.begin(), got.end(), 1), std::count(mask.begin(), mask.end(), 1));
      if (ratio == 1.0) {
        int64_t left = -1;
        brute_rebuild<F>(row, got, 1.0, &left);
        ASSERT_EQ(left, 0) << "a beneficial pair is left after ratio 1, trial " << trial;
      }
    }
  }
}

TEST(Rebuild, RandomFp32RowsMatchTheSpec) { random_rebuilds<Fp32>(3); }
TEST(Rebuild, RandomBf16RowsMatchTheSpec) { random_rebuilds<Bf16>(4); }

// N:M rebuild: every group keeps its count; the row-level regrowth is the unstructured one's.
TEST(Rebuild, RandomNmRowsKeepGroupCounts) {
  std::mt19937 gen(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int m = trial % 2 ? 4 : 8;
    const int n = m / 2;
    const int64_t groups = std::uniform_int_distribution<int64_t>(1, 200)(gen);
    std::vector<uint32_t> row(groups * m);
    std::uniform_int_distribution<int> small(-3, 3);
    std::normal_distribution<float> normal;
    for (auto& b : row) b = f32_bits(trial % 3 == 0 ? static_cast<float>(small(gen)) : normal(gen));
    std::vector<uint8_t> mask(row.size());
    std::vector<uint32_t> other(row.size());
    for (auto& b : other) b = f32_bits(normal(gen));
    for (int64_t g = 0; g < groups; ++g) {  // a 2:4 / 4:8 mask from other scores
      const std::vector<uint32_t> group(other.begin() + g * m, other.begin() + (g + 1) * m);
      const auto keep = brute_topk<Fp32>(group, n);
      std::copy(keep.begin(), keep.end(), mask.begin() + g * m);
    }
    for (double ratio : {0.1, 0.5, 1.0}) {
      int err = -1;
      const auto got = run_rebuild<Fp32>(row, mask, ratio, m, &err);
      ASSERT_EQ(err, 0);
      const auto flat = brute_rebuild<Fp32>(row, mask, ratio);
      for (int64_t g = 0; g < groups; ++g) {
        int kept = 0;
        for (int j = 0; j < m; ++j) {
          const int64_t i = g * m + j;
          kept += got[i];
          if (!mask[i]) {
            ASSERT_EQ(got[i], flat[i]) << "regrowth differs from the unstructured one";
          }
        }
        ASSERT_EQ(kept, n) << "trial " << trial << " group " << g;
      }
    }
  }
}

}  // namespace
