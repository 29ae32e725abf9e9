// LLM-Barber mask rebuild of one row (docs/algorithm.md §4.4 and §4.6; reference:
// barber/reference.py rebuild_mask).
//
// P = the pruned entries of the row, K = the kept ones. Sort P best-first (a1, a2, ...) and
// K worst-first (b1, b2, ...) in the total order of core/order.h. R = #{i : score(a_i) >
// score(b_i)} (strict; a prefix), s = floor(ratio * R) computed in double (swap_count), and
// the rebuild regrows a1..as and prunes b1..bs: the kept count is unchanged.
// N:M variant (m > 0): s and a1..as as above; then every group of m columns that regrew r
// entries prunes the r worst of its previously kept entries, so every group keeps its count.
// The input must be a valid N:M mask (every group keeps the same number of entries,
// kErrorNmMask otherwise) and no group may regrow more entries than it kept
// (kErrorNmOverflow; impossible when n >= m - n, e.g. 2:4 and 4:8).
//
// No sort is needed. With A(t) = #{p in P : key(p) > t} and B(t) = #{q in K : key(q) <= t}:
//   R = max over keys t of min(A(t), B(t)).
// (a_r > b_r implies A(b_r) >= r and B(b_r) >= r; A(t) >= r and B(t) >= r imply a_r > t >= b_r.)
// A is non-increasing and B non-decreasing, so with t* the smallest key where B(t*) >= A(t*):
//   R = max(A(t*), B(t* - 1)),
// and t* is found digit by digit from histograms of P and K (crossing_bucket), like a radix
// select. a_s and b_s are then plain selections (the s-th best of P, the s-th worst of K).
//
// Torch-free and header-only; crossing_bucket and the group fix-up run on host and device.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/macros.h"
#include "core/nm_mask.h"
#include "core/order.h"
#include "core/topk_row.h"

namespace barber {
namespace core {

// Error bits of rebuild_mask (besides kErrorNaN): the input mask is not a valid N:M mask /
// a group regrew more entries than it had kept.
constexpr int kErrorNmMask = 2;
constexpr int kErrorNmOverflow = 4;

// States of an entry during the N:M fix-up.
constexpr uint8_t kStatePruned = 0;
constexpr uint8_t kStateKept = 1;
constexpr uint8_t kStateRegrown = 2;
constexpr uint8_t kStateDropped = 3;  // was kept, pruned by the fix-up

// The number of swaps: floor(ratio * R) in double precision, identical on every backend.
BARBER_HOST_DEVICE inline int64_t swap_count(double ratio, int64_t beneficial) {
  return static_cast<int64_t>(floor(ratio * static_cast<double>(beneficial)));
}

// One digit of the search for t*: hP and hK count the pruned and kept entries per bucket
// within the current key range; on entry *p_above counts the pruned entries above the range
// and *k_below the kept entries below it. Returns the smallest bucket d with
// k_below + #K(<= d) >= p_above + #P(> d), and moves both counts to bucket d's range.
// At full resolution *p_above = A(t*) and *k_below = B(t* - 1).
BARBER_HOST_DEVICE inline int crossing_bucket(const uint32_t* hP, const uint32_t* hK, uint64_t* p_above,
                                              uint64_t* k_below) {
  uint64_t total_p = 0;
  for (int d = 0; d < kDigitBins; ++d) total_p += hP[d];
  uint64_t cum_p = 0, cum_k = 0;
  for (int d = 0; d < kDigitBins; ++d) {
    cum_p += hP[d];
    cum_k += hK[d];
    if (*k_below + cum_k >= *p_above + (total_p - cum_p)) {
      *p_above += total_p - cum_p;
      *k_below += cum_k - hK[d];
      return d;
    }
  }
  return kDigitBins - 1;  // unreachable: the last bucket always satisfies the test
}

// N:M fix-up of one group: keys[0..m) its order keys, state[0..m) kStatePruned, kStateKept
// or kStateRegrown. Prunes the r worst kept entries (r = regrown count) and leaves state as
// 0/1 (kept). Returns false, state unspecified, if r exceeds the kept count.
template <class Key>
BARBER_HOST_DEVICE inline bool nm_fixup_group(const Key* keys, uint8_t* state, int m) {
  int regrown = 0, kept = 0;
  for (int j = 0; j < m; ++j) {
    regrown += state[j] == kStateRegrown;
    kept += state[j] == kStateKept;
  }
  if (regrown > kept) return false;
  if (regrown > 0) {
    for (int j = 0; j < m; ++j) {
      if (state[j] != kStateKept && state[j] != kStateDropped) continue;
      int worse = 0;  // previously kept entries of the group that rank after j
      for (int i = 0; i < m; ++i) {
        const bool was_kept = state[i] == kStateKept || state[i] == kStateDropped;
        worse += was_kept && ranks_after(keys[i], i, keys[j], j);
      }
      if (worse < regrown) state[j] = kStateDropped;
    }
  }
  for (int j = 0; j < m; ++j) state[j] = state[j] == kStateKept || state[j] == kStateRegrown;
  return true;
}

// ---------------------------------------------------------------------------------------
// Host (CPU) rebuild.

// crossing_bucket over two arrays of 16-bit values (P and K candidates), two 8-bit digits.
inline void crossing_u16(const uint16_t* vp, size_t np, const uint16_t* vk, size_t nk, uint64_t* p_above,
                         uint64_t* k_below) {
  uint32_t hp[kDigitBins] = {}, hk[kDigitBins] = {};
  for (size_t i = 0; i < np; ++i) ++hp[vp[i] >> 8];
  for (size_t i = 0; i < nk; ++i) ++hk[vk[i] >> 8];
  const int hi = crossing_bucket(hp, hk, p_above, k_below);
  std::memset(hp, 0, sizeof hp);
  std::memset(hk, 0, sizeof hk);
  for (size_t i = 0; i < np; ++i) hp[vp[i] & 0xFF] += (vp[i] >> 8) == hi;
  for (size_t i = 0; i < nk; ++i) hk[vk[i] & 0xFF] += (vk[i] >> 8) == hi;
  crossing_bucket(hp, hk, p_above, k_below);
}

// Whether every group of m columns of mask[0..n) keeps exactly `group_kept` entries.
inline bool nm_groups_consistent(const uint8_t* mask, int64_t n, int64_t m, int64_t group_kept) {
  for (int64_t g = 0; g < n; g += m) {
    int64_t kept = 0;
    for (int64_t j = 0; j < m; ++j) kept += mask[g + j] != 0;
    if (kept != group_kept) return false;
  }
  return true;
}

// CPU rebuild of one row at a time; holds the scratch, so make one per thread and reuse it.
template <class F>
class RebuildRow {
 public:
  using Key = typename F::Bits;
  static constexpr bool kWide = sizeof(Key) == 4;

  // max_cols: the longest row (kept for the interface; scratch grows with the candidates).
  explicit RebuildRow(int64_t max_cols = 0) : hist_(2) { static_cast<void>(max_cols); }

  // Writes the rebuilt mask of row[0..n) (mask: 0/1 bytes) to out. m == 0: unstructured;
  // m > 0: N:M variant, every group of the input must keep `group_kept` entries. Returns 0
  // or the error bits (kErrorNaN, kErrorNmMask, kErrorNmOverflow); out is then unspecified.
  int run(const Key* row, const uint8_t* mask, int64_t n, double ratio, int64_t m, int64_t group_kept,
          uint8_t* out) {
    beneficial_ = 0;
    swaps_ = 0;
    bool nan = false;
    uint32_t n_kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      nan |= is_nan<F>(row[i]);
      const uint32_t kept = mask[i] != 0;
      const uint32_t key = order_key<F>(row[i]);
      n_kept += kept;
      hist_.add(kept << 16 | (kWide ? key >> 16 : key), i);
    }
    if (nan) {
      hist_.clear();
      return kErrorNaN;
    }
    hist_.finish();
    if (m > 0 && !nm_groups_consistent(mask, n, m, group_kept)) {
      hist_.clear();
      return kErrorNmMask;
    }
    const uint32_t n_pruned = static_cast<uint32_t>(n) - n_kept;
    if (ratio == 0.0 || n_pruned == 0 || n_kept == 0) {
      hist_.clear();
      copy_mask(mask, n, out);
      return 0;
    }

    // R from the crossing point t* (file comment).
    uint64_t p_above = 0, k_below = 0;
    const int c = crossing_bucket(hist_.coarse(0), hist_.coarse(1), &p_above, &k_below);
    const int f = crossing_bucket(hist_.fine(0, c), hist_.fine(1, c), &p_above, &k_below);
    if constexpr (kWide) {
      const uint32_t hi = static_cast<uint32_t>(c << 8 | f);
      cand_p_.clear();
      cand_k_.clear();
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = order_key<F>(row[i]);
        if ((key >> 16) == hi) (mask[i] ? cand_k_ : cand_p_).push_back(static_cast<uint16_t>(key));
      }
      crossing_u16(cand_p_.data(), cand_p_.size(), cand_k_.data(), cand_k_.size(), &p_above, &k_below);
    }
    beneficial_ = static_cast<int64_t>(std::max(p_above, k_below));
    swaps_ = swap_count(ratio, beneficial_);
    if (swaps_ == 0) {
      hist_.clear();
      copy_mask(mask, n, out);
      return 0;
    }

    // a_s: the s-th best pruned entry; b_s: the s-th worst kept entry (unstructured only).
    const uint32_t s = static_cast<uint32_t>(swaps_);
    Threshold<Key> grow{}, drop{};
    if constexpr (!kWide) {
      uint32_t above = 0, below = 0;
      grow.key = static_cast<Key>(hist_.top(0, s, &above));
      grow.take = s - above;
      grow.equal = hist_.count(0, grow.key);
      if (m == 0) {
        drop.key = static_cast<Key>(hist_.bottom(1, s, &below));
        drop.take = s - below;
        drop.equal = hist_.count(1, drop.key);
      }
      hist_.clear();
    } else {
      uint32_t above1 = 0, below1 = 0;
      const uint32_t hp = hist_.top(0, s, &above1);
      const uint32_t hk = m == 0 ? hist_.bottom(1, s, &below1) : 0;
      hist_.clear();
      cand_p_.clear();
      cand_k_.clear();
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = order_key<F>(row[i]);
        const bool kept = mask[i] != 0;
        if (!kept && (key >> 16) == hp) cand_p_.push_back(static_cast<uint16_t>(key));
        if (kept && m == 0 && (key >> 16) == hk) cand_k_.push_back(static_cast<uint16_t>(key));
      }
      uint32_t above2 = 0, below2 = 0, equal = 0;
      const uint16_t lo_p = top_u16(cand_p_.data(), cand_p_.size(), s - above1, &above2, &equal);
      grow = {static_cast<Key>(hp << 16 | lo_p), s - above1 - above2, equal};
      if (m == 0) {
        const uint16_t lo_k = bottom_u16(cand_k_.data(), cand_k_.size(), s - below1, &below2, &equal);
        drop = {static_cast<Key>(hk << 16 | lo_k), s - below1 - below2, equal};
      }
    }
    if (m == 0) {
      write_swaps(row, mask, n, grow, drop, out);
      return 0;
    }
    write_regrowth(row, mask, n, grow, out);
    return fixup_groups(row, out, n, m) ? 0 : kErrorNmOverflow;
  }

  // R and s of the last run() (0 when it stopped early); for tests.
  int64_t beneficial() const { return beneficial_; }
  int64_t swaps() const { return swaps_; }

 private:
  static void copy_mask(const uint8_t* mask, int64_t n, uint8_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = mask[i] != 0;
  }

  // Unstructured output: regrow the grow-selection of P, prune the drop-selection of K.
  // Ties at the thresholds: the lowest columns of grow.key regrow, the highest of drop.key
  // drop (so the lowest drop.equal - drop.take of them stay).
  static void write_swaps(const Key* row, const uint8_t* mask, int64_t n, Threshold<Key> grow, Threshold<Key> drop,
                          uint8_t* out) {
    const bool grow_all = grow.take == grow.equal;
    const bool drop_all = drop.take == drop.equal;
    const auto grow_above = strict_threshold<F>(grow.key, grow_all);
    const auto keep_above = strict_threshold<F>(drop.key, false);
    for (int64_t i = 0; i < n; ++i) {
      const auto key = signed_order_key<F>(row[i]);
      out[i] = mask[i] ? key > keep_above : key > grow_above;
    }
    if (!grow_all) mark_first_ties<F>(row, mask, 0, grow.key, grow.take, 1, out);
    if (!drop_all) mark_first_ties<F>(row, mask, 1, drop.key, drop.equal - drop.take, 1, out);
  }

  // N:M stage 1: state kStateKept / kStateRegrown / kStatePruned per entry.
  static void write_regrowth(const Key* row, const uint8_t* mask, int64_t n, Threshold<Key> grow, uint8_t* out) {
    const bool grow_all = grow.take == grow.equal;
    const auto grow_above = strict_threshold<F>(grow.key, grow_all);
    for (int64_t i = 0; i < n; ++i) {
      const auto key = signed_order_key<F>(row[i]);
      out[i] = mask[i] ? kStateKept : key > grow_above ? kStateRegrown : kStatePruned;
    }
    if (!grow_all) mark_first_ties<F>(row, mask, 0, grow.key, grow.take, kStateRegrown, out);
  }

  // N:M stage 2: nm_fixup_group on every group (a sort for groups wider than kNmMaxGroup).
  bool fixup_groups(const Key* row, uint8_t* state, int64_t n, int64_t m) {
    Key keys[kNmMaxGroup];
    for (int64_t g = 0; g < n; g += m) {
      if (m <= kNmMaxGroup) {
        for (int64_t j = 0; j < m; ++j) keys[j] = order_key<F>(row[g + j]);
        if (!nm_fixup_group(keys, state + g, static_cast<int>(m))) return false;
      } else if (!fixup_wide_group(row + g, state + g, m)) {
        return false;
      }
    }
    return true;
  }

  bool fixup_wide_group(const Key* row, uint8_t* state, int64_t m) {
    int64_t regrown = 0;
    kept_.clear();
    for (int64_t j = 0; j < m; ++j) {
      regrown += state[j] == kStateRegrown;
      if (state[j] == kStateKept) kept_.push_back(j);
    }
    if (regrown > static_cast<int64_t>(kept_.size())) return false;
    if (regrown > 0) {
      auto worse_first = [row](int64_t a, int64_t b) {
        return ranks_after(order_key<F>(row[a]), a, order_key<F>(row[b]), b);
      };
      std::nth_element(kept_.begin(), kept_.begin() + (regrown - 1), kept_.end(), worse_first);
      for (int64_t i = 0; i < regrown; ++i) state[kept_[i]] = kStateDropped;
    }
    for (int64_t j = 0; j < m; ++j) state[j] = state[j] == kStateKept || state[j] == kStateRegrown;
    return true;
  }

  Hist16 hist_;
  std::vector<uint16_t> cand_p_, cand_k_;
  std::vector<int64_t> kept_;
  int64_t beneficial_ = 0;
  int64_t swaps_ = 0;
};

}  // namespace core
}  // namespace barber
