// CPU implementations of the packing ops: pack_24, unpack_24, pack_bitmask, unpack_bitmask.
// Semantics: barber/reference.py; layouts: csrc/core/pack24.h and csrc/core/bitmask.h.
// Every op parallelises over rows with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>

#include "core/bitmask.h"
#include "core/pack24.h"
#include "pack_checks.h"

namespace barber {
namespace {

// Rows per parallel_for task: about this many dense elements.
constexpr int64_t kGrainElements = 1 << 16;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

// Lowers `slot` to `value` (first error wins regardless of thread timing).
void atomic_min(std::atomic<int64_t>& slot, int64_t value) {
  int64_t seen = slot.load();
  while (value < seen && !slot.compare_exchange_weak(seen, value)) {
  }
}

template <typename Bits>
std::tuple<at::Tensor, at::Tensor> pack_24_typed(const at::Tensor& dense) {
  using E = pack24::Elem<Bits>;
  using Meta = typename E::Meta;
  constexpr int64_t kWordCols = pack24::word_cols<Bits>();
  const at::Tensor in = dense.contiguous();
  const int64_t rows = in.size(0);
  const int64_t cols = in.size(1);
  const int64_t ncols = cols / kWordCols;
  at::Tensor values = at::empty({rows, cols / 2}, in.options());
  at::Tensor meta = at::empty({rows, ncols}, in.options().dtype(sizeof(Meta) == 2 ? at::kShort : at::kInt));
  const Bits* src = static_cast<const Bits*>(in.const_data_ptr());
  Bits* dst = static_cast<Bits*>(values.mutable_data_ptr());
  Meta* words = static_cast<Meta*>(meta.mutable_data_ptr());
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < ncols; ++c) {
        const int64_t w = r * ncols + c;
        Meta word;
        const int bad = pack24::pack_word<Bits>(src + w * kWordCols, dst + w * (kWordCols / 2), &word);
        words[pack24::meta_offset<Bits>(r, c, rows)] = word;
        if (bad >= 0) atomic_min(first_bad, w * (kWordCols / 4) + bad);
      }
    }
  });
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) pack_checks::fail_not_24(in, first_bad.load());
  return {values, meta};
}

template <typename Bits>
at::Tensor unpack_24_typed(const at::Tensor& values_in, const at::Tensor& meta_in) {
  using Meta = typename pack24::Elem<Bits>::Meta;
  constexpr int64_t kWordCols = pack24::word_cols<Bits>();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor meta = meta_in.contiguous();
  const int64_t rows = values.size(0);
  const int64_t cols = 2 * values.size(1);
  const int64_t ncols = cols / kWordCols;
  at::Tensor dense = at::empty({rows, cols}, values.options());
  const Bits* src = static_cast<const Bits*>(values.const_data_ptr());
  const Meta* words = static_cast<const Meta*>(meta.const_data_ptr());
  Bits* dst = static_cast<Bits*>(dense.mutable_data_ptr());
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < ncols; ++c) {
        const int64_t w = r * ncols + c;
        const int bad = pack24::unpack_word<Bits>(words[pack24::meta_offset<Bits>(r, c, rows)],
                                                  src + w * (kWordCols / 2), dst + w * kWordCols);
        if (bad >= 0) atomic_min(first_bad, w * (kWordCols / 4) + bad);
      }
    }
  });
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) pack_checks::fail_bad_meta(values, first_bad.load());
  return dense;
}

std::tuple<at::Tensor, at::Tensor> pack_24_cpu(const at::Tensor& dense) {
  pack_checks::check_pack_24(dense);
  if (dense.scalar_type() == at::kChar) return pack_24_typed<uint8_t>(dense);
  return pack_24_typed<uint16_t>(dense);  // float16 and bfloat16: same bits handling
}

at::Tensor unpack_24_cpu(const at::Tensor& values, const at::Tensor& meta) {
  pack_checks::check_unpack_24(values, meta);
  if (values.scalar_type() == at::kChar) return unpack_24_typed<uint8_t>(values, meta);
  return unpack_24_typed<uint16_t>(values, meta);
}

at::Tensor pack_bitmask_cpu(const at::Tensor& mask_in) {
  pack_checks::check_pack_bitmask(mask_in);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t rows = mask.size(0);
  const int64_t cols = mask.size(1);
  const int64_t nbytes = bitmask::packed_cols(cols);
  at::Tensor bits = at::empty({rows, nbytes}, mask.options().dtype(at::kByte));
  const uint8_t* src = static_cast<const uint8_t*>(mask.const_data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(bits.mutable_data_ptr());
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) bitmask::pack_row(src + r * cols, cols, dst + r * nbytes);
  });
  return bits;
}

at::Tensor unpack_bitmask_cpu(const at::Tensor& bits_in, int64_t cols) {
  pack_checks::check_unpack_bitmask(bits_in, cols);
  const at::Tensor bits = bits_in.contiguous();
  const int64_t rows = bits.size(0);
  const int64_t nbytes = bits.size(1);
  at::Tensor mask = at::empty({rows, cols}, bits.options().dtype(at::kBool));
  const uint8_t* src = static_cast<const uint8_t*>(bits.const_data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(mask.mutable_data_ptr());
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) bitmask::unpack_row(src + r * nbytes, cols, dst + r * cols);
  });
  return mask;
}

}  // namespace
}  // namespace barber

TORCH_LIBRARY_IMPL(barber, CPU, m) {
  m.impl("pack_24", &barber::pack_24_cpu);
  m.impl("unpack_24", &barber::unpack_24_cpu);
  m.impl("pack_bitmask", &barber::pack_bitmask_cpu);
  m.impl("unpack_bitmask", &barber::unpack_bitmask_cpu);
}
