// CPU implementations of the mask ops: topk_mask, nm_mask, rebuild_mask.
// Semantics: barber/reference.py; ranking rule: csrc/core/order.h. Every op parallelises
// over rows with at::parallel_for, each task reusing one scratch (histograms) for its rows.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dispatch.h"
#include "mask_checks.h"
#include "core/nm_mask.h"
#include "core/order.h"
#include "core/rebuild.h"
#include "core/topk_row.h"

namespace barber {
namespace {

// Rows per parallel_for task: about this many elements.
constexpr int64_t kGrainElements = 1 << 15;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

template <class T>
struct FormatOf;
template <>
struct FormatOf<float> {
  using type = core::Fp32;
};
template <>
struct FormatOf<c10::Half> {
  using type = core::Fp16;
};
template <>
struct FormatOf<c10::BFloat16> {
  using type = core::Bf16;
};

// Raw IEEE bits of contiguous scores (float, c10::Half and c10::BFloat16 are plain bits).
template <class F, class T>
const typename F::Bits* score_bits(const at::Tensor& t) {
  static_assert(sizeof(T) == sizeof(typename F::Bits), "score type and bits differ in size");
  return reinterpret_cast<const typename F::Bits*>(t.const_data_ptr<T>());
}

uint8_t* mask_bytes(at::Tensor& t) { return reinterpret_cast<uint8_t*>(t.mutable_data_ptr<bool>()); }

// A new bool mask [rows, cols] like `like`. Large masks are advised onto transparent huge
// pages before first touch: on hosts with THP in "madvise" mode, filling a fresh 70 MB mask
// otherwise costs more in 4 KiB page faults than the selection itself.
at::Tensor new_mask(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kBool));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(out.numel())) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
  return out;
}

// 2:4-style selection is a few vector compares per group: an AVX2 clone (picked at load
// time on x86-64 Linux) runs it about 1.5x faster than the baseline SSE2 build.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define BARBER_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BARBER_CPU_CLONES
#endif

#define BARBER_NM_FIXED(NAME, FORMAT, M)                                                              \
  BARBER_CPU_CLONES int NAME(const FORMAT::Bits* scores, int64_t groups, int n, uint8_t* out) {      \
    return core::nm_groups<FORMAT, M>(scores, groups, M, n, out);                                     \
  }
BARBER_NM_FIXED(nm4_fp32, core::Fp32, 4)
BARBER_NM_FIXED(nm4_fp16, core::Fp16, 4)
BARBER_NM_FIXED(nm4_bf16, core::Bf16, 4)
BARBER_NM_FIXED(nm8_fp32, core::Fp32, 8)
BARBER_NM_FIXED(nm8_fp16, core::Fp16, 8)
BARBER_NM_FIXED(nm8_bf16, core::Bf16, 8)
#undef BARBER_NM_FIXED

// n:m groups with m = 4 or 8 (the vectorised clones above); false for other m.
template <class F>
bool nm_fixed(const typename F::Bits* scores, int64_t groups, int m, int n, uint8_t* out, int* errors) {
  if (m != 4 && m != 8) return false;
  if constexpr (std::is_same_v<F, core::Fp32>) {
    *errors = m == 4 ? nm4_fp32(scores, groups, n, out) : nm8_fp32(scores, groups, n, out);
  } else if constexpr (std::is_same_v<F, core::Fp16>) {
    *errors = m == 4 ? nm4_fp16(scores, groups, n, out) : nm8_fp16(scores, groups, n, out);
  } else {
    *errors = m == 4 ? nm4_bf16(scores, groups, n, out) : nm8_bf16(scores, groups, n, out);
  }
  return true;
}

// Keep-k mask of `rows` contiguous rows of length `cols`; returns the error bits.
template <class F>
int topk_rows(const typename F::Bits* src, int64_t rows, int64_t cols, int64_t k, uint8_t* dst) {
  std::atomic<int> errors{0};
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    core::TopkRow<F> select(cols);
    int local = 0;
    for (int64_t r = begin; r < end; ++r) local |= select.run(src + r * cols, cols, k, dst + r * cols);
    if (local) errors.fetch_or(local);
  });
  return errors.load();
}

at::Tensor topk_mask_cpu(const at::Tensor& scores, int64_t k) {
  checks::check_topk(scores, k);
  const at::Tensor in = scores.contiguous();
  at::Tensor out = new_mask(in);
  int errors = 0;
  BARBER_DISPATCH_SCORES(in.scalar_type(), "barber::topk_mask", [&] {
    using F = typename FormatOf<scalar_t>::type;
    errors = topk_rows<F>(score_bits<F, scalar_t>(in), in.size(0), in.size(1), k, mask_bytes(out));
  });
  checks::raise_kernel_errors("topk_mask", errors);
  return out;
}

at::Tensor nm_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m) {
  checks::check_nm(scores, n, m);
  const at::Tensor in = scores.contiguous();
  at::Tensor out = new_mask(in);
  const int64_t rows = in.size(0), cols = in.size(1);
  int errors = 0;
  BARBER_DISPATCH_SCORES(in.scalar_type(), "barber::nm_mask", [&] {
    using F = typename FormatOf<scalar_t>::type;
    const auto* src = score_bits<F, scalar_t>(in);
    uint8_t* dst = mask_bytes(out);
    const int64_t groups = rows * (cols / std::max<int64_t>(m, 1));
    if (m > core::kNmMaxGroup) {
      // Wide groups are rows of a top-k selection.
      errors = topk_rows<F>(src, groups, m, n, dst);
      return;
    }
    std::atomic<int> found{0};
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrainElements / m), [&](int64_t begin, int64_t end) {
      const auto* s = src + begin * m;
      uint8_t* d = dst + begin * m;
      const int64_t count = end - begin;
      int local = 0;
      if (!nm_fixed<F>(s, count, static_cast<int>(m), static_cast<int>(n), d, &local)) {
        local = core::nm_groups<F>(s, count, static_cast<int>(m), static_cast<int>(n), d);
      }
      if (local) found.fetch_or(local);
    });
    errors = found.load();
  });
  checks::raise_kernel_errors("nm_mask", errors);
  return out;
}

at::Tensor rebuild_mask_cpu(const at::Tensor& scores, const at::Tensor& mask, double ratio, int64_t m) {
  checks::check_rebuild(scores, mask, ratio, m);
  const at::Tensor in = scores.contiguous();
  const at::Tensor kept = mask.contiguous();
  at::Tensor out = new_mask(in);
  const int64_t rows = in.size(0), cols = in.size(1);
  const uint8_t* kept_bytes = reinterpret_cast<const uint8_t*>(kept.const_data_ptr<bool>());
  // N:M: every group must keep as many entries as the first one.
  int64_t group_kept = 0;
  if (m > 0 && rows > 0 && cols > 0) {
    group_kept = std::count_if(kept_bytes, kept_bytes + m, [](uint8_t b) { return b != 0; });
  }
  int errors = 0;
  BARBER_DISPATCH_SCORES(in.scalar_type(), "barber::rebuild_mask", [&] {
    using F = typename FormatOf<scalar_t>::type;
    const auto* src = score_bits<F, scalar_t>(in);
    uint8_t* dst = mask_bytes(out);
    std::atomic<int> found{0};
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      core::RebuildRow<F> rebuild(cols);
      int local = 0;
      for (int64_t r = begin; r < end; ++r) {
        local |= rebuild.run(src + r * cols, kept_bytes + r * cols, cols, ratio, m, group_kept, dst + r * cols);
      }
      if (local) found.fetch_or(local);
    });
    errors = found.load();
  });
  checks::raise_kernel_errors("rebuild_mask", errors, m);
  return out;
}

}  // namespace
}  // namespace barber

TORCH_LIBRARY_IMPL(barber, CPU, m) {
  m.impl("topk_mask", &barber::topk_mask_cpu);
  m.impl("nm_mask", &barber::nm_mask_cpu);
  m.impl("rebuild_mask", &barber::rebuild_mask_cpu);
}
