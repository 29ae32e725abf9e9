// Row-wise top-k selection on order keys (core/order.h): "keep the k best entries of a row".
//
// The result of a selection is a Threshold {key, take, equal}: keep every entry whose key
// is greater than `key`, plus the `take` lowest-column entries among the `equal` entries
// whose key equals `key` (1 <= take <= equal). This is exactly "the first k in the total
// order" and needs no sort.
//
// Searching histograms of 8-bit digits (top_bucket, bottom_bucket) works on host and device:
// the CUDA kernels (core/mask_kernels.cuh) run an MSD radix select with 256-bin histograms.
// The host selector (TopkRow) is the CPU kernel:
//   16-bit keys (float16, bfloat16): one pass builds a 65536-bin histogram of the keys (with
//     a 256-bin coarse level so that a search reads at most 2 x 256 bins), then one pass
//     writes the mask.
//   32-bit keys (float32): the same histogram of the high 16 bits finds the bucket of the
//     k-th key; a second pass gathers the low halves of the keys in that bucket (usually a
//     few dozen), two small 8-bit passes over them finish the key, a third pass writes.
// Cost is O(cols) per row with no sort; ties are resolved by column index, never by a
// data-dependent order.
//
// Torch-free and header-only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/macros.h"
#include "core/order.h"

namespace barber {
namespace core {

constexpr int kDigitBins = 256;

// The bucket holding the k-th largest of the values counted in h[0..255], 1 <= k <= sum(h).
// Returns d with above < k <= above + h[d], where above counts the values in buckets > d.
BARBER_HOST_DEVICE inline int top_bucket(const uint32_t* h, uint32_t k, uint32_t* above) {
  uint32_t acc = 0;
  for (int d = kDigitBins - 1; d > 0; --d) {
    if (acc + h[d] >= k) {
      *above = acc;
      return d;
    }
    acc += h[d];
  }
  *above = acc;
  return 0;
}

// The bucket holding the s-th smallest value, 1 <= s <= sum(h); below counts buckets < d.
BARBER_HOST_DEVICE inline int bottom_bucket(const uint32_t* h, uint32_t s, uint32_t* below) {
  uint32_t acc = 0;
  for (int d = 0; d < kDigitBins - 1; ++d) {
    if (acc + h[d] >= s) {
      *below = acc;
      return d;
    }
    acc += h[d];
  }
  *below = acc;
  return kDigitBins - 1;
}

// See the file comment. For a "prune the worst s" selection (rebuild) the same fields mean:
// prune every entry with key < `key` and the `take` HIGHEST-column entries with key == `key`.
template <class Key>
struct Threshold {
  Key key;
  uint32_t take;
  uint32_t equal;
};

// ---------------------------------------------------------------------------------------
// Host (CPU) selection.

// 65536-bin histograms of 16-bit digits with a 256-bin coarse level, in `planes`
// independent planes (plane p counts values added as (p << 16) | digit). The coarse level
// is counted in kLanes interleaved copies (add(v, i) uses copy i % kLanes), so that runs of
// equal coarse bins do not serialise on one counter; finish() sums them before a search.
// Stays all-zero between uses: clear() zeroes only the fine blocks whose coarse bin was hit.
class Hist16 {
 public:
  static constexpr int kLanes = 4;

  explicit Hist16(int planes = 1)
      : coarse_bins_(static_cast<size_t>(planes) << 8),
        fine_(static_cast<size_t>(planes) << 16, 0u),
        lanes_(kLanes * coarse_bins_, 0u),
        coarse_(coarse_bins_, 0u) {}

  void add(uint32_t plane_digit, int64_t i) {
    ++fine_[plane_digit];
    ++lanes_[(static_cast<size_t>(i) & (kLanes - 1)) * coarse_bins_ + (plane_digit >> 8)];
  }
  // Sums the coarse copies; call after the last add() and before the searches below.
  void finish() {
    for (size_t c = 0; c < coarse_bins_; ++c) {
      uint32_t sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += lanes_[l * coarse_bins_ + c];
      coarse_[c] = sum;
    }
  }
  const uint32_t* coarse(int plane) const { return coarse_.data() + (static_cast<size_t>(plane) << 8); }
  const uint32_t* fine(int plane, int coarse_bin) const {
    return fine_.data() + (static_cast<size_t>(plane) << 16) + (static_cast<size_t>(coarse_bin) << 8);
  }
  uint32_t count(int plane, uint32_t digit) const { return fine_[(static_cast<size_t>(plane) << 16) | digit]; }

  // The k-th largest digit of a plane (1 <= k <= its total); *above = count of larger digits.
  uint32_t top(int plane, uint32_t k, uint32_t* above) const {
    uint32_t a1 = 0, a2 = 0;
    const int c = top_bucket(coarse(plane), k, &a1);
    const int f = top_bucket(fine(plane, c), k - a1, &a2);
    *above = a1 + a2;
    return static_cast<uint32_t>(c << 8 | f);
  }
  // The s-th smallest digit of a plane; *below = count of smaller digits.
  uint32_t bottom(int plane, uint32_t s, uint32_t* below) const {
    uint32_t b1 = 0, b2 = 0;
    const int c = bottom_bucket(coarse(plane), s, &b1);
    const int f = bottom_bucket(fine(plane, c), s - b1, &b2);
    *below = b1 + b2;
    return static_cast<uint32_t>(c << 8 | f);
  }

  // Back to all-zero (with or without finish()).
  void clear() {
    for (size_t c = 0; c < coarse_bins_; ++c) {
      uint32_t hit = 0;
      for (int l = 0; l < kLanes; ++l) {
        hit |= lanes_[l * coarse_bins_ + c];
        lanes_[l * coarse_bins_ + c] = 0;
      }
      if (hit != 0) std::memset(fine_.data() + (c << 8), 0, kDigitBins * sizeof(uint32_t));
      coarse_[c] = 0;
    }
  }

 private:
  size_t coarse_bins_;
  std::vector<uint32_t> fine_;
  std::vector<uint32_t> lanes_;
  std::vector<uint32_t> coarse_;
};

// The k-th largest of v[0..n) (1 <= k <= n) by two 8-bit passes; *above counts the larger
// values and *equal the values equal to it.
inline uint16_t top_u16(const uint16_t* v, size_t n, uint32_t k, uint32_t* above, uint32_t* equal) {
  uint32_t h[kDigitBins] = {};
  for (size_t i = 0; i < n; ++i) ++h[v[i] >> 8];
  uint32_t a1 = 0, a2 = 0;
  const int hi = top_bucket(h, k, &a1);
  std::memset(h, 0, sizeof h);
  for (size_t i = 0; i < n; ++i) h[v[i] & 0xFF] += (v[i] >> 8) == hi;
  const int lo = top_bucket(h, k - a1, &a2);
  *above = a1 + a2;
  *equal = h[lo];
  return static_cast<uint16_t>(hi << 8 | lo);
}

// The s-th smallest of v[0..n) (1 <= s <= n); *below counts the smaller values.
inline uint16_t bottom_u16(const uint16_t* v, size_t n, uint32_t s, uint32_t* below, uint32_t* equal) {
  uint32_t h[kDigitBins] = {};
  for (size_t i = 0; i < n; ++i) ++h[v[i] >> 8];
  uint32_t b1 = 0, b2 = 0;
  const int hi = bottom_bucket(h, s, &b1);
  std::memset(h, 0, sizeof h);
  for (size_t i = 0; i < n; ++i) h[v[i] & 0xFF] += (v[i] >> 8) == hi;
  const int lo = bottom_bucket(h, s - b1, &b2);
  *below = b1 + b2;
  *equal = h[lo];
  return static_cast<uint16_t>(hi << 8 | lo);
}

// signed_order_key threshold t such that "key > t" keeps exactly the entries above
// `key` (inclusive = false) or those at or above it (inclusive = true). A valid key is
// never the smallest signed value (that is a NaN's), so key - 1 cannot wrap.
template <class F>
inline std::make_signed_t<typename F::Bits> strict_threshold(typename F::Bits key, bool inclusive) {
  using SKey = std::make_signed_t<typename F::Bits>;
  const SKey k = static_cast<SKey>(static_cast<typename F::Bits>(key ^ F::kSign));
  return inclusive ? static_cast<SKey>(k - 1) : k;
}

// Sets out[i] = value for the first `count` entries i (in column order) with order key
// `key` whose select[i] equals `select_value` (nullptr: every entry qualifies).
template <class F>
inline void mark_first_ties(const typename F::Bits* row, const uint8_t* select, uint8_t select_value,
                            typename F::Bits key, uint32_t count, uint8_t value, uint8_t* out) {
  for (int64_t i = 0; count > 0; ++i) {
    if (order_key<F>(row[i]) == key && (select == nullptr || (select[i] != 0) == (select_value != 0))) {
      out[i] = value;
      --count;
    }
  }
}

// Writes out[i] = "entry i is among the kept" for a top-k Threshold: one vectorisable
// compare pass, then (only when the threshold key is split) a short scan for the ties.
template <class F>
inline void write_topk_mask(const typename F::Bits* row, int64_t n, Threshold<typename F::Bits> t, uint8_t* out) {
  const bool all_ties = t.take == t.equal;
  const auto threshold = strict_threshold<F>(t.key, all_ties);
  for (int64_t i = 0; i < n; ++i) out[i] = signed_order_key<F>(row[i]) > threshold;
  if (!all_ties) mark_first_ties<F>(row, nullptr, 0, t.key, t.take, 1, out);
}

// Whether row[0..n) holds a NaN.
template <class F>
inline bool has_nan(const typename F::Bits* row, int64_t n) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) nan |= is_nan<F>(row[i]);
  return nan;
}

// CPU top-k of one row at a time; holds the scratch, so make one per thread and reuse it.
template <class F>
class TopkRow {
 public:
  using Key = typename F::Bits;
  static constexpr bool kWide = sizeof(Key) == 4;

  // max_cols: the longest row (kept for the interface; scratch grows with the candidates).
  explicit TopkRow(int64_t max_cols = 0) : hist_(1) { static_cast<void>(max_cols); }

  // The threshold of the k best of row[0..n), 1 <= k <= n; returns kErrorNaN on a NaN.
  int select(const Key* row, int64_t n, int64_t k, Threshold<Key>* t) {
    const uint32_t kk = static_cast<uint32_t>(k);
    if constexpr (!kWide) {
      bool nan = false;
      for (int64_t i = 0; i < n; ++i) {
        nan |= is_nan<F>(row[i]);
        hist_.add(order_key<F>(row[i]), i);
      }
      if (nan) {
        hist_.clear();
        return kErrorNaN;
      }
      hist_.finish();
      uint32_t above = 0;
      t->key = static_cast<Key>(hist_.top(0, kk, &above));
      t->take = kk - above;
      t->equal = hist_.count(0, t->key);
      hist_.clear();
      return 0;
    } else {
      return select_wide(row, n, kk, t);
    }
  }

  // Writes the keep-k mask of row[0..n) (0 <= k <= n) to out; returns kErrorNaN on a NaN
  // (out is then unspecified).
  int run(const Key* row, int64_t n, int64_t k, uint8_t* out) {
    if (k == 0 || k == n) {
      if (has_nan<F>(row, n)) return kErrorNaN;
      std::memset(out, k == 0 ? 0 : 1, static_cast<size_t>(n));
      return 0;
    }
    Threshold<Key> t{};
    const int err = select(row, n, k, &t);
    if (err) return err;
    write_topk_mask<F>(row, n, t, out);
    return 0;
  }

 private:
  // select() for 32-bit keys: high 16 bits by histogram, low 16 bits among the candidates.
  int select_wide(const Key* row, int64_t n, uint32_t kk, Threshold<Key>* t) {
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) {
      nan |= is_nan<F>(row[i]);
      hist_.add(static_cast<uint32_t>(order_key<F>(row[i])) >> 16, i);
    }
    if (nan) {
      hist_.clear();
      return kErrorNaN;
    }
    hist_.finish();
    uint32_t above1 = 0, above2 = 0, equal = 0;
    const uint32_t hi = hist_.top(0, kk, &above1);
    hist_.clear();
    cand_.clear();  // usually a few dozen keys: memory follows the candidates, not the row
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = order_key<F>(row[i]);
      if ((key >> 16) == hi) cand_.push_back(static_cast<uint16_t>(key));
    }
    const uint16_t lo = top_u16(cand_.data(), cand_.size(), kk - above1, &above2, &equal);
    t->key = static_cast<Key>(hi << 16 | lo);
    t->take = kk - above1 - above2;
    t->equal = equal;
    return 0;
  }

  Hist16 hist_;
  std::vector<uint16_t> cand_;
};

}  // namespace core
}  // namespace barber
