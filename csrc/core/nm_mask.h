// N:M selection: in every group of m consecutive columns keep the n best (core/order.h).
//
// A group is resolved by ranks: entry j's rank is the number of entries of its group that
// rank before it (higher score, or equal score and lower column); it is kept iff rank < n.
// That is m*m compares per group, branch-free and in registers for the common 2:4 and 4:8;
// groups wider than kNmMaxGroup are resolved as rows of the top-k selection
// (core/topk_row.h on the CPU, the radix-select kernel on CUDA).
//
// Torch-free and header-only; host and device.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/macros.h"
#include "core/order.h"

namespace barber {
namespace core {

// Widest group resolved by ranks; wider groups go through the top-k selection.
constexpr int kNmMaxGroup = 32;

// Rank of entry j among keys[0..m) (0 = best).
template <class Key>
BARBER_HOST_DEVICE inline int group_rank(const Key* keys, int m, int j) {
  int rank = 0;
  for (int i = 0; i < m; ++i) rank += ranks_before(keys[i], i, keys[j], j);
  return rank;
}

// out[j] = 1 iff entry j is among the n best of keys[0..m).
template <class Key>
BARBER_HOST_DEVICE inline void nm_group(const Key* keys, int m, int n, uint8_t* out) {
  for (int j = 0; j < m; ++j) out[j] = group_rank(keys, m, j) < n;
}

// The same with m fixed at compile time (fully unrolled).
template <int M, class Key>
BARBER_HOST_DEVICE inline void nm_group_fixed(const Key* keys, int n, uint8_t* out) {
BARBER_UNROLL
  for (int j = 0; j < M; ++j) {
    int rank = 0;
BARBER_UNROLL
    for (int i = 0; i < M; ++i) rank += ranks_before(keys[i], i, keys[j], j);
    out[j] = rank < n;
  }
}

// Host: the n:m mask of groups [0, groups) of contiguous scores (group g = scores[g*m ..
// g*m+m)), m <= kNmMaxGroup; M > 0 fixes m at compile time (written so that g++ vectorises
// the loop over groups). Returns kErrorNaN if a score is NaN (out is then unspecified).
template <class F, int M = 0>
inline int nm_groups(const typename F::Bits* __restrict scores, int64_t groups, int m, int n,
                     uint8_t* __restrict out) {
  if constexpr (M > 0) {
    // Blocks of groups small enough to stay in L1 between the NaN check and the selection;
    // the check has its own loop because its accumulator would stop g++ vectorising below.
    constexpr int64_t kBlock = 2048 / M;
    for (int64_t g0 = 0; g0 < groups; g0 += kBlock) {
      const int64_t g1 = groups - g0 < kBlock ? groups : g0 + kBlock;
      uint32_t nan = 0;
      for (int64_t i = g0 * M; i < g1 * M; ++i) nan |= static_cast<uint32_t>(is_nan<F>(scores[i]));
      if (nan) return kErrorNaN;
      for (int64_t g = g0; g < g1; ++g) {
        int32_t k[M];  // 16-bit keys widened: g++ vectorises 32-bit compares reliably
        BARBER_UNROLL
        for (int j = 0; j < M; ++j) k[j] = signed_order_key<F>(scores[g * M + j]);
        BARBER_UNROLL
        for (int j = 0; j < M; ++j) {
          int rank = 0;
          BARBER_UNROLL
          for (int i = 0; i < M; ++i) rank += i < j ? k[i] >= k[j] : k[i] > k[j];
          out[g * M + j] = rank < n;
        }
      }
    }
    return 0;
  } else {
    using SKey = std::make_signed_t<typename F::Bits>;
    bool nan = false;
    SKey k[kNmMaxGroup];
    for (int64_t g = 0; g < groups; ++g) {
      const typename F::Bits* src = scores + g * m;
      for (int j = 0; j < m; ++j) {
        nan |= is_nan<F>(src[j]);
        k[j] = signed_order_key<F>(src[j]);
      }
      nm_group(k, m, n, out + g * m);
    }
    return nan ? kErrorNaN : 0;
  }
}

}  // namespace core
}  // namespace barber
