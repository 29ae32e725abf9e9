// Input validation of the packing ops, shared by the CPU (csrc/cpu/pack_ops.cpp) and CUDA
// (csrc/cuda/pack_ops.cu) implementations so both reject the same inputs with the same
// one-line messages: "barber::<op>: expected ..., got ...". barber/reference.py and the fakes in
// barber/ops.py raise the same messages; dtypes are spelled as Python prints them (py_format.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "core/bitmask.h"
#include "core/pack24.h"
#include "py_format.h"

namespace barber {
namespace pack_checks {

// Whether `dtype` has a 2:4 CUTLASS layout here, and the words that say so.
inline void check_24_dtype(const char* op, const char* arg, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kChar, op, ": expected ", arg,
              " of dtype float16, bfloat16 or int8, got ", dtype_name(dtype),
              dtype == at::kFloat ? " (float32 uses CUTLASS's 1:2 TF32 layout, which barber does not produce; "
                                    "cast to float16 or bfloat16)"
                                  : "");
}

// CUTLASS minimum shape (and multiple) of the dense matrix: 32x64 for 16-bit, 16x128 for int8.
inline void check_24_dense_shape(const char* op, at::ScalarType dtype, int64_t rows, int64_t cols) {
  const bool is8 = dtype == at::kChar;
  const int64_t min_rows = is8 ? pack24::Elem<uint8_t>::kMinRows : pack24::Elem<uint16_t>::kMinRows;
  const int64_t min_cols = is8 ? pack24::Elem<uint8_t>::kMinCols : pack24::Elem<uint16_t>::kMinCols;
  TORCH_CHECK(rows >= min_rows && rows % min_rows == 0 && cols >= min_cols && cols % min_cols == 0, op,
              ": expected a dense shape [rows, cols] with rows a positive multiple of ", min_rows,
              " and cols a positive multiple of ", min_cols, " (CUTLASS 2:4 minimum for ", dtype_name(dtype),
              "), got [", rows, ", ", cols, "]");
}

inline void check_pack_24(const at::Tensor& dense) {
  constexpr const char* op = "barber::pack_24";
  TORCH_CHECK(dense.dim() == 2, op, ": expected a 2-D dense tensor, got ", dense.dim(), " dimensions");
  check_24_dtype(op, "dense", dense.scalar_type());
  check_24_dense_shape(op, dense.scalar_type(), dense.size(0), dense.size(1));
}

inline void check_unpack_24(const at::Tensor& values, const at::Tensor& meta) {
  constexpr const char* op = "barber::unpack_24";
  TORCH_CHECK(values.dim() == 2, op, ": expected 2-D values, got ", values.dim(), " dimensions");
  TORCH_CHECK(meta.dim() == 2, op, ": expected 2-D meta, got ", meta.dim(), " dimensions");
  check_24_dtype(op, "values", values.scalar_type());
  TORCH_CHECK(meta.device() == values.device(), op, ": expected meta on the device of values (", values.device(),
              "), got ", meta.device());
  const bool is8 = values.scalar_type() == at::kChar;
  const at::ScalarType meta_dtype = is8 ? at::kInt : at::kShort;
  TORCH_CHECK(meta.scalar_type() == meta_dtype, op, ": expected meta of dtype ", dtype_name(meta_dtype), " for ",
              dtype_name(values.scalar_type()), " values, got ", dtype_name(meta.scalar_type()));
  const int64_t rows = values.size(0);
  const int64_t cols = 2 * values.size(1);
  const int64_t word_cols = is8 ? pack24::word_cols<uint8_t>() : pack24::word_cols<uint16_t>();
  check_24_dense_shape(op, values.scalar_type(), rows, cols);
  TORCH_CHECK(meta.size(0) == rows && meta.size(1) * word_cols == cols, op, ": expected meta of shape [", rows,
              ", ", cols / word_cols, "] for values of shape [", rows, ", ", cols / 2, "], got [", meta.size(0),
              ", ", meta.size(1), "]");
}

inline void check_pack_bitmask(const at::Tensor& mask) {
  constexpr const char* op = "barber::pack_bitmask";
  TORCH_CHECK(mask.dim() == 2, op, ": expected a 2-D mask, got ", mask.dim(), " dimensions");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": expected mask of dtype bool, got ",
              dtype_name(mask.scalar_type()));
}

inline void check_unpack_bitmask(const at::Tensor& bits, int64_t cols) {
  constexpr const char* op = "barber::unpack_bitmask";
  TORCH_CHECK(bits.dim() == 2, op, ": expected 2-D bits, got ", bits.dim(), " dimensions");
  TORCH_CHECK(bits.scalar_type() == at::kByte, op, ": expected bits of dtype uint8, got ",
              dtype_name(bits.scalar_type()));
  TORCH_CHECK(cols >= 0, op, ": expected cols >= 0, got ", cols);
  TORCH_CHECK(bits.size(1) == bitmask::packed_cols(cols), op, ": expected bits.size(1) == ceil(cols/8) = ",
              bitmask::packed_cols(cols), " for cols=", cols, ", got ", bits.size(1));
}

// The error for a group with more than 2 nonzeros; `flat_group` = row * cols/4 + group.
// `dense` may live on any device (this is the slow error path).
[[noreturn]] inline void fail_not_24(const at::Tensor& dense, int64_t flat_group) {
  const int64_t groups_per_row = dense.size(1) / 4;
  const int64_t row = flat_group / groups_per_row;
  const int64_t col = flat_group % groups_per_row * 4;
  const int64_t nonzeros = dense.select(0, row).narrow(0, col, 4).ne(0).sum().item<int64_t>();
  TORCH_CHECK(false, "barber::pack_24: expected at most 2 nonzeros in every group of 4 columns, got ", nonzeros,
              " in row ", row, ", columns ", col, "..", col + 3, " (prune to 2:4 before packing)");
}

// The error for an invalid group code in meta; `flat_group` indexes the dense groups.
[[noreturn]] inline void fail_bad_meta(const at::Tensor& values, int64_t flat_group) {
  const int64_t groups_per_row = values.size(1) / 2;
  const int64_t row = flat_group / groups_per_row;
  const int64_t col = flat_group % groups_per_row * 4;
  TORCH_CHECK(false, "barber::unpack_24: expected valid 2:4 metadata codes, got an invalid code for row ", row,
              ", columns ", col, "..", col + 3, " (meta is not the output of pack_24)");
}

}  // namespace pack_checks
}  // namespace barber
