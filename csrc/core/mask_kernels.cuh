// CUDA kernels of the mask ops (topk_mask, nm_mask, rebuild_mask), torch-free: plain nvcc
// compiles this header (tests/cpp/compile_mask_kernels.cu) and csrc/cuda/mask_ops.cu binds it
// to torch. Semantics: barber/reference.py; ranking rule: core/order.h.
//
// Row kernels (top-k, rebuild): one CTA of kRowThreads threads per row. The row's order keys
// are held in shared memory when they fit (else re-read from global memory each pass), and
// an MSD radix select over 8-bit digits (2 passes for 16-bit keys, 4 for 32-bit) finds the
// threshold key with a 256-bin shared histogram per pass (warp-aggregated atomics) and a
// block scan over the bins. Ties at the threshold are resolved by column with a block
// prefix scan over the row in tiles, only when the threshold key is split.
// The rebuild finds R with the crossing search of core/rebuild.h (histograms of pruned and
// kept entries per digit), then the s-th best pruned and s-th worst kept keys in the same
// way; the N:M variant ends with core::nm_fixup_group per group.
// N:M kernel: one thread per group of m <= core::kNmMaxGroup columns (ranks in registers);
// wider groups run as rows of the top-k kernel.
//
// Errors (a NaN score, an invalid N:M mask, an overfull group) are OR-ed into `errors`
// (core::kError* bits); the caller reads them back and raises.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/macros.h"
#include "core/nm_mask.h"
#include "core/order.h"
#include "core/rebuild.h"
#include "core/topk_row.h"

namespace barber {
namespace kernels {

// Threads per CTA of the row kernels: a multiple of 32, at least one per histogram bin.
constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / 32;
// Threads per CTA of the N:M kernel (one group per thread).
constexpr int kGroupThreads = 256;
// Dynamic shared memory above which a kernel must opt in (cudaFuncSetAttribute).
constexpr size_t kDefaultSmemBytes = 48 * 1024;
static_assert(kRowThreads % 32 == 0 && kRowThreads >= core::kDigitBins, "one thread per bin at least");

template <class T>
struct FormatOf;
template <>
struct FormatOf<float> {
  using type = core::Fp32;
};
template <>
struct FormatOf<__half> {
  using type = core::Fp16;
};
template <>
struct FormatOf<__nv_bfloat16> {
  using type = core::Bf16;
};

// ---------------------------------------------------------------------------------------
// Block-level helpers (every thread of the CTA must call them).

// Inclusive prefix sum over the CTA in thread order; *total = the sum of all values.
// `warp_totals` is shared scratch of kRowWarps values.
template <class V>
__device__ inline V block_inclusive_scan(V v, V* warp_totals, V* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const V up = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += up;
  }
  if (lane == 31) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = lane < kRowWarps ? warp_totals[lane] : V(0);
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const V up = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += up;
    }
    if (lane < kRowWarps) warp_totals[lane] = w;
  }
  __syncthreads();
  const V before = warp > 0 ? warp_totals[warp - 1] : V(0);
  *total = warp_totals[kRowWarps - 1];
  __syncthreads();  // warp_totals may be reused right after
  return v + before;
}

// hist[bin] += 1 for every active lane, one atomic per distinct bin of the warp (the keys of
// real rows concentrate on few bins, where plain atomics would serialise). All 32 lanes of
// the warp must call it together.
__device__ inline void hist_add(uint32_t* hist, uint32_t bin, bool active) {
  const unsigned peers = __match_any_sync(0xffffffffu, active ? bin : 0xffffffffu);
  if (active && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// Order keys of one row: from shared memory, or recomputed from the global scores.
template <class F, bool kSmem>
struct RowKeys {
  using Key = typename F::Bits;
  const Key* bits;  // the row's raw score bits (global)
  const Key* keys;  // the row's order keys (shared), when kSmem
  __device__ Key operator()(int64_t i) const {
    if constexpr (kSmem) {
      return keys[i];
    } else {
      return core::order_key<F>(bits[i]);
    }
  }
};

// Writes dst[i] = "entry i is kept" for the top-k threshold {t, take, equal} of a row.
template <class KeyFn, class Key>
__device__ inline void write_topk_row(const KeyFn& key, int64_t cols, Key t, uint32_t take, uint32_t equal,
                                      uint8_t* dst, uint32_t* warp_totals) {
  if (take == equal) {
    for (int64_t i = threadIdx.x; i < cols; i += kRowThreads) dst[i] = key(i) >= t;
    return;
  }
  uint32_t seen = 0;  // entries equal to t in earlier tiles
  for (int64_t base = 0; base < cols; base += kRowThreads) {
    const int64_t i = base + threadIdx.x;
    Key k = 0;
    uint32_t eq = 0;
    if (i < cols) {
      k = key(i);
      eq = k == t;
    }
    uint32_t total = 0;
    const uint32_t incl = block_inclusive_scan<uint32_t>(eq, warp_totals, &total);
    if (i < cols) dst[i] = k > t || (eq && seen + incl - eq < take);
    seen += total;
  }
}

// ---------------------------------------------------------------------------------------
// topk_mask: grid = rows, block = kRowThreads, dynamic smem = cols * sizeof(key) if kSmem.
template <class T, bool kSmem>
__global__ void __launch_bounds__(kRowThreads)
    topk_mask_kernel(const T* __restrict__ scores, int64_t cols, int64_t k, uint8_t* __restrict__ out,
                     int* __restrict__ errors) {
  using F = typename FormatOf<T>::type;
  using Key = typename F::Bits;
  constexpr int kKeyBits = 8 * sizeof(Key);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint32_t hist[core::kDigitBins];
  __shared__ uint32_t warp_totals[kRowWarps];
  __shared__ uint32_t found[3];  // digit, count above it, count in it

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const Key* bits = reinterpret_cast<const Key*>(scores) + row * cols;
  uint8_t* dst = out + row * cols;
  Key* skeys = reinterpret_cast<Key*>(smem_raw);

  bool nan = false;
  for (int64_t i = tid; i < cols; i += kRowThreads) {
    const Key b = bits[i];
    nan |= core::is_nan<F>(b);
    if constexpr (kSmem) skeys[i] = core::order_key<F>(b);
  }
  if (__syncthreads_or(nan)) {
    if (tid == 0) atomicOr(errors, core::kErrorNaN);
    return;
  }
  if (k == 0 || k == cols) {
    for (int64_t i = tid; i < cols; i += kRowThreads) dst[i] = k != 0;
    return;
  }

  const RowKeys<F, kSmem> key{bits, skeys};
  Key prefix = 0, prefix_mask = 0;
  uint32_t remaining = static_cast<uint32_t>(k), equal = 0;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int d = tid; d < core::kDigitBins; d += kRowThreads) hist[d] = 0;
    __syncthreads();
    for (int64_t base = 0; base < cols; base += kRowThreads) {
      const int64_t i = base + tid;
      bool active = false;
      uint32_t digit = 0;
      if (i < cols) {
        const Key kk = key(i);
        active = static_cast<Key>(kk & prefix_mask) == prefix;
        digit = (kk >> shift) & 0xFFu;
      }
      hist_add(hist, digit, active);
    }
    __syncthreads();
    // Thread t holds bin 255 - t: the inclusive scan counts the keys at or above that bin.
    const uint32_t h = tid < core::kDigitBins ? hist[core::kDigitBins - 1 - tid] : 0u;
    uint32_t total = 0;
    const uint32_t at_or_above = block_inclusive_scan<uint32_t>(h, warp_totals, &total);
    if (tid < core::kDigitBins && at_or_above >= remaining && at_or_above - h < remaining) {
      found[0] = core::kDigitBins - 1 - tid;
      found[1] = at_or_above - h;
      found[2] = h;
    }
    __syncthreads();
    prefix = static_cast<Key>(prefix | (found[0] << shift));
    prefix_mask = static_cast<Key>(prefix_mask | (0xFFu << shift));
    remaining -= found[1];
    equal = found[2];
    __syncthreads();  // found[] and hist are rewritten by the next digit
  }
  write_topk_row(key, cols, prefix, remaining, equal, dst, warp_totals);
}

// ---------------------------------------------------------------------------------------
// nm_mask: one thread per group of m columns (M > 0: m fixed at compile time), grid-stride.
template <class T, int M>
__global__ void __launch_bounds__(kGroupThreads)
    nm_mask_kernel(const T* __restrict__ scores, int64_t groups, int m, int n, uint8_t* __restrict__ out,
                   int* __restrict__ errors) {
  using F = typename FormatOf<T>::type;
  using Key = typename F::Bits;
  constexpr int kCap = M > 0 ? M : core::kNmMaxGroup;
  const int mm = M > 0 ? M : m;
  const Key* bits = reinterpret_cast<const Key*>(scores);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    Key keys[kCap];
    uint8_t keep[kCap];
    bool nan = false;
    const Key* src = bits + g * mm;
    for (int j = 0; j < mm; ++j) {
      const Key b = src[j];
      nan |= core::is_nan<F>(b);
      keys[j] = core::order_key<F>(b);
    }
    if (nan) {
      atomicOr(errors, core::kErrorNaN);
      continue;
    }
    if constexpr (M > 0) {
      core::nm_group_fixed<M>(keys, n, keep);
    } else {
      core::nm_group(keys, mm, n, keep);
    }
    uint8_t* dst = out + g * mm;
    if constexpr (M == 4) {
      *reinterpret_cast<uchar4*>(dst) = make_uchar4(keep[0], keep[1], keep[2], keep[3]);  // 4-byte aligned
    } else {
      for (int j = 0; j < mm; ++j) dst[j] = keep[j];
    }
  }
}

// ---------------------------------------------------------------------------------------
// rebuild_mask: grid = rows, block = kRowThreads, dynamic smem = cols * (sizeof(key) + 1)
// if kSmem (keys, then one state byte per entry). m = 0: unstructured, else N:M groups of m.
template <class T, bool kSmem>
__global__ void __launch_bounds__(kRowThreads)
    rebuild_mask_kernel(const T* __restrict__ scores, const uint8_t* __restrict__ mask, int64_t cols, double ratio,
                        int64_t m, uint8_t* __restrict__ out, int* __restrict__ errors) {
  using F = typename FormatOf<T>::type;
  using Key = typename F::Bits;
  constexpr int kKeyBits = 8 * sizeof(Key);
  constexpr int kBins = core::kDigitBins;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint32_t hist[2 * kBins];  // [0, 256): pruned entries, [256, 512): kept entries
  __shared__ uint32_t warp_totals[kRowWarps];
  __shared__ unsigned long long warp_totals64[kRowWarps];
  __shared__ unsigned long long crossing[3];  // digit, pruned above, kept below
  __shared__ uint32_t grow_found[3], drop_found[3];  // digit, count beyond it, count in it
  __shared__ int64_t group_kept;

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const Key* bits = reinterpret_cast<const Key*>(scores) + row * cols;
  const uint8_t* kept_in = mask + row * cols;
  uint8_t* dst = out + row * cols;
  Key* skeys = reinterpret_cast<Key*>(smem_raw);
  uint8_t* sstate = smem_raw + cols * sizeof(Key);
  // Per-entry state: the input mask, later the N:M stage-1 states (shared, or the output row).
  uint8_t* state = kSmem ? sstate : dst;

  bool nan = false;
  for (int64_t i = tid; i < cols; i += kRowThreads) {
    const Key b = bits[i];
    nan |= core::is_nan<F>(b);
    if constexpr (kSmem) skeys[i] = core::order_key<F>(b);
    state[i] = kept_in[i] != 0;
  }
  if (__syncthreads_or(nan)) {
    if (tid == 0) atomicOr(errors, core::kErrorNaN);
    return;
  }
  if (m > 0) {
    if (tid == 0) {
      int64_t c = 0;
      for (int64_t j = 0; j < m; ++j) c += mask[j] != 0;  // the first group of row 0
      group_kept = c;
    }
    __syncthreads();
    bool bad = false;
    for (int64_t g = tid; g < cols / m; g += kRowThreads) {
      int64_t c = 0;
      for (int64_t j = 0; j < m; ++j) c += state[g * m + j];
      bad |= c != group_kept;
    }
    if (__syncthreads_or(bad)) {
      if (tid == 0) atomicOr(errors, core::kErrorNmMask);
      return;
    }
  }
  if (ratio == 0.0) {
    if constexpr (kSmem) {
      for (int64_t i = tid; i < cols; i += kRowThreads) dst[i] = state[i];
    }
    return;  // without shared memory the output row already holds the mask
  }

  const RowKeys<F, kSmem> key{bits, skeys};
  // R (core/rebuild.h): the smallest key t* with B(t*) >= A(t*), digit by digit.
  unsigned long long p_above = 0, k_below = 0;
  Key prefix = 0, prefix_mask = 0;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int d = tid; d < 2 * kBins; d += kRowThreads) hist[d] = 0;
    __syncthreads();
    for (int64_t base = 0; base < cols; base += kRowThreads) {
      const int64_t i = base + tid;
      bool active = false;
      uint32_t bin = 0;
      if (i < cols) {
        const Key kk = key(i);
        active = static_cast<Key>(kk & prefix_mask) == prefix;
        bin = ((kk >> shift) & 0xFFu) + (state[i] ? kBins : 0u);
      }
      hist_add(hist, bin, active);
    }
    __syncthreads();
    const uint32_t hp = tid < kBins ? hist[tid] : 0u;
    const uint32_t hk = tid < kBins ? hist[kBins + tid] : 0u;
    unsigned long long total = 0;
    const unsigned long long incl = block_inclusive_scan<unsigned long long>(
        hp | (static_cast<unsigned long long>(hk) << 32), warp_totals64, &total);
    if (tid < kBins) {
      const long long total_p = static_cast<long long>(total & 0xFFFFFFFFull);
      const long long cum_p = static_cast<long long>(incl & 0xFFFFFFFFull);
      const long long cum_k = static_cast<long long>(incl >> 32);
      const long long above = static_cast<long long>(p_above) + total_p - cum_p;  // pruned above bucket tid
      const long long below = static_cast<long long>(k_below) + cum_k - hk;        // kept below bucket tid
      const bool here = static_cast<long long>(k_below) + cum_k >= above;
      const bool before = below >= above + hp;  // the same test at the end of bucket tid - 1
      if (here && (tid == 0 || !before)) {
        crossing[0] = static_cast<unsigned long long>(tid);
        crossing[1] = static_cast<unsigned long long>(above);
        crossing[2] = static_cast<unsigned long long>(below);
      }
    }
    __syncthreads();
    prefix = static_cast<Key>(prefix | (static_cast<uint32_t>(crossing[0]) << shift));
    prefix_mask = static_cast<Key>(prefix_mask | (0xFFu << shift));
    p_above = crossing[1];
    k_below = crossing[2];
    __syncthreads();
  }
  const int64_t beneficial = static_cast<int64_t>(p_above > k_below ? p_above : k_below);
  const int64_t swaps = core::swap_count(ratio, beneficial);
  if (swaps == 0) {
    if constexpr (kSmem) {
      for (int64_t i = tid; i < cols; i += kRowThreads) dst[i] = state[i];
    }
    return;
  }

  // The s-th best pruned key (grow) and, unstructured, the s-th worst kept key (drop).
  const bool unstructured = m == 0;
  Key grow = 0, drop = 0;
  prefix_mask = 0;
  uint32_t grow_take = static_cast<uint32_t>(swaps), drop_take = static_cast<uint32_t>(swaps);
  uint32_t grow_equal = 0, drop_equal = 0;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int d = tid; d < 2 * kBins; d += kRowThreads) hist[d] = 0;
    __syncthreads();
    for (int64_t base = 0; base < cols; base += kRowThreads) {
      const int64_t i = base + tid;
      bool active = false;
      uint32_t bin = 0;
      if (i < cols) {
        const Key kk = key(i);
        const bool kept = state[i] != 0;
        const Key want = kept ? drop : grow;
        active = static_cast<Key>(kk & prefix_mask) == want && (!kept || unstructured);
        bin = ((kk >> shift) & 0xFFu) + (kept ? kBins : 0u);
      }
      hist_add(hist, bin, active);
    }
    __syncthreads();
    // Thread t: pruned bin 255 - t (counting from the top), kept bin t (from the bottom).
    const uint32_t hp = tid < kBins ? hist[kBins - 1 - tid] : 0u;
    const uint32_t hk = tid < kBins ? hist[kBins + tid] : 0u;
    unsigned long long total = 0;
    const unsigned long long incl = block_inclusive_scan<unsigned long long>(
        hp | (static_cast<unsigned long long>(hk) << 32), warp_totals64, &total);
    if (tid < kBins) {
      const uint32_t cum_p = static_cast<uint32_t>(incl & 0xFFFFFFFFull);
      const uint32_t cum_k = static_cast<uint32_t>(incl >> 32);
      if (cum_p >= grow_take && cum_p - hp < grow_take) {
        grow_found[0] = kBins - 1 - tid;
        grow_found[1] = cum_p - hp;
        grow_found[2] = hp;
      }
      if (unstructured && cum_k >= drop_take && cum_k - hk < drop_take) {
        drop_found[0] = tid;
        drop_found[1] = cum_k - hk;
        drop_found[2] = hk;
      }
    }
    __syncthreads();
    grow = static_cast<Key>(grow | (grow_found[0] << shift));
    grow_take -= grow_found[1];
    grow_equal = grow_found[2];
    if (unstructured) {
      drop = static_cast<Key>(drop | (drop_found[0] << shift));
      drop_take -= drop_found[1];
      drop_equal = drop_found[2];
    }
    prefix_mask = static_cast<Key>(prefix_mask | (0xFFu << shift));
    __syncthreads();
  }

  // Output. Ties: the lowest columns of `grow` regrow; the highest of `drop` are pruned, so
  // the lowest drop_equal - drop_take of them stay.
  const uint32_t stay = drop_equal - drop_take;
  if (grow_take == grow_equal && (!unstructured || drop_take == drop_equal)) {
    for (int64_t i = tid; i < cols; i += kRowThreads) {
      const Key kk = key(i);
      const uint8_t kept = state[i];
      if (unstructured) {
        dst[i] = kept ? kk > drop : kk >= grow;
      } else {
        state[i] = kept ? core::kStateKept : kk >= grow ? core::kStateRegrown : core::kStatePruned;
      }
    }
  } else {
    uint32_t seen_grow = 0, seen_drop = 0;
    for (int64_t base = 0; base < cols; base += kRowThreads) {
      const int64_t i = base + tid;
      Key kk = 0;
      uint8_t kept = 0;
      uint32_t eq_grow = 0, eq_drop = 0;
      if (i < cols) {
        kk = key(i);
        kept = state[i];
        eq_grow = !kept && kk == grow;
        eq_drop = kept && unstructured && kk == drop;
      }
      uint32_t total = 0;  // per tile both counts stay below 2^16
      const uint32_t incl = block_inclusive_scan<uint32_t>(eq_grow | (eq_drop << 16), warp_totals, &total);
      const uint32_t rank_grow = seen_grow + (incl & 0xFFFFu) - eq_grow;
      const uint32_t rank_drop = seen_drop + (incl >> 16) - eq_drop;
      if (i < cols) {
        const bool regrow = kk > grow || (eq_grow && rank_grow < grow_take);
        if (unstructured) {
          dst[i] = kept ? (kk > drop || (eq_drop && rank_drop < stay)) : regrow;
        } else {
          state[i] = kept ? core::kStateKept : regrow ? core::kStateRegrown : core::kStatePruned;
        }
      }
      seen_grow += total & 0xFFFFu;
      seen_drop += total >> 16;
    }
  }
  if (unstructured) return;

  // N:M stage 2: every group that regrew r entries drops its r worst previously kept ones.
  __syncthreads();
  bool overflow = false;
  if (m <= core::kNmMaxGroup) {
    for (int64_t g = tid; g < cols / m; g += kRowThreads) {
      Key keys[core::kNmMaxGroup];
      uint8_t st[core::kNmMaxGroup];
      for (int j = 0; j < m; ++j) {
        keys[j] = key(g * m + j);
        st[j] = state[g * m + j];
      }
      overflow |= !core::nm_fixup_group(keys, st, static_cast<int>(m));
      for (int j = 0; j < m; ++j) dst[g * m + j] = st[j];
    }
  } else {
    // Wide groups: the CTA works through the groups one at a time.
    for (int64_t g0 = 0; g0 < cols; g0 += m) {
      unsigned long long counts = 0;  // regrown | kept << 32
      for (int64_t j = tid; j < m; j += kRowThreads) {
        counts += (state[g0 + j] == core::kStateRegrown) |
                  (static_cast<unsigned long long>(state[g0 + j] == core::kStateKept) << 32);
      }
      unsigned long long sums = 0;
      block_inclusive_scan<unsigned long long>(counts, warp_totals64, &sums);
      const int64_t regrown = static_cast<int64_t>(sums & 0xFFFFFFFFull);
      overflow |= regrown > static_cast<int64_t>(sums >> 32);
      if (regrown > 0 && !overflow) {
        for (int64_t j = tid; j < m; j += kRowThreads) {
          if (state[g0 + j] != core::kStateKept && state[g0 + j] != core::kStateDropped) continue;
          const Key kj = key(g0 + j);
          int64_t worse = 0;
          for (int64_t i = 0; i < m; ++i) {
            const uint8_t si = state[g0 + i];
            worse += (si == core::kStateKept || si == core::kStateDropped) && core::ranks_after(key(g0 + i), i, kj, j);
          }
          if (worse < regrown) state[g0 + j] = core::kStateDropped;
        }
      }
      __syncthreads();
      for (int64_t j = tid; j < m; j += kRowThreads) {
        const uint8_t s = state[g0 + j];
        dst[g0 + j] = s == core::kStateKept || s == core::kStateRegrown;
      }
      __syncthreads();
    }
  }
  if (__syncthreads_or(overflow) && tid == 0) atomicOr(errors, core::kErrorNmOverflow);
}

// ---------------------------------------------------------------------------------------
// Host launchers (torch-free). Pointers are device pointers to contiguous row-major data;
// errors is one device int, zeroed by the caller. They return the launch status.

// Whether `bytes` of dynamic shared memory fit next to the kernel's static shared memory;
// opts the kernel in above the 48 KiB default.
template <class Kernel>
cudaError_t prepare_smem(Kernel kernel, size_t bytes, bool* fits) {
  *fits = false;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attr{};
  err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (bytes + attr.sharedSizeBytes > static_cast<size_t>(optin)) return cudaSuccess;
  *fits = true;
  if (bytes > kDefaultSmemBytes) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }
  return cudaSuccess;
}

// Keep the k best of every row: scores [rows, cols], out [rows, cols] bytes (0/1).
template <class T>
cudaError_t launch_topk_mask(const T* scores, int64_t rows, int64_t cols, int64_t k, uint8_t* out, int* errors,
                             cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  using Key = typename FormatOf<T>::type::Bits;
  const size_t smem = static_cast<size_t>(cols) * sizeof(Key);
  bool fits = false;
  const cudaError_t err = prepare_smem(topk_mask_kernel<T, true>, smem, &fits);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(rows));
  if (fits) {
    topk_mask_kernel<T, true><<<grid, kRowThreads, smem, stream>>>(scores, cols, k, out, errors);
  } else {
    topk_mask_kernel<T, false><<<grid, kRowThreads, 0, stream>>>(scores, cols, k, out, errors);
  }
  return cudaGetLastError();
}

// n:m mask of scores [rows, cols] (cols divisible by m).
template <class T>
cudaError_t launch_nm_mask(const T* scores, int64_t rows, int64_t cols, int n, int m, uint8_t* out, int* errors,
                           cudaStream_t stream) {
  const int64_t groups = rows * (cols / m);
  if (groups == 0) return cudaSuccess;
  if (m > core::kNmMaxGroup) return launch_topk_mask(scores, groups, m, n, out, errors, stream);
  const int64_t wanted = (groups + kGroupThreads - 1) / kGroupThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < (1 << 20) ? wanted : (1 << 20));
  if (m == 4) {
    nm_mask_kernel<T, 4><<<blocks, kGroupThreads, 0, stream>>>(scores, groups, m, n, out, errors);
  } else if (m == 8) {
    nm_mask_kernel<T, 8><<<blocks, kGroupThreads, 0, stream>>>(scores, groups, m, n, out, errors);
  } else {
    nm_mask_kernel<T, 0><<<blocks, kGroupThreads, 0, stream>>>(scores, groups, m, n, out, errors);
  }
  return cudaGetLastError();
}

// LLM-Barber rebuild of mask [rows, cols] (bytes 0/1) by scores; m = 0 or the N:M group size.
template <class T>
cudaError_t launch_rebuild_mask(const T* scores, const uint8_t* mask, int64_t rows, int64_t cols, double ratio,
                                int64_t m, uint8_t* out, int* errors, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  using Key = typename FormatOf<T>::type::Bits;
  const size_t smem = static_cast<size_t>(cols) * (sizeof(Key) + 1);
  bool fits = false;
  const cudaError_t err = prepare_smem(rebuild_mask_kernel<T, true>, smem, &fits);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(rows));
  if (fits) {
    rebuild_mask_kernel<T, true><<<grid, kRowThreads, smem, stream>>>(scores, mask, cols, ratio, m, out, errors);
  } else {
    rebuild_mask_kernel<T, false><<<grid, kRowThreads, 0, stream>>>(scores, mask, cols, ratio, m, out, errors);
  }
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace barber
