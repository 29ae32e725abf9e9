// Input validation of the mask ops (topk_mask, nm_mask, rebuild_mask), shared by the CPU
// (csrc/cpu/mask_ops.cpp) and CUDA (csrc/cuda/mask_ops.cu) implementations, so both reject
// the same inputs with the same one-line messages "barber::<op>: expected ..., got ...".
// barber/reference.py and the fakes in barber/ops.py raise the same messages (RuntimeError, like
// TORCH_CHECK); py_format.h spells dtypes and floats as Python does.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "core/order.h"
#include "core/rebuild.h"
#include "py_format.h"

namespace barber {
namespace checks {

inline bool is_score_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// scores: 2-D float32/float16/bfloat16 (any strides), fewer than 2^31 columns.
inline void check_scores(const char* op, const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2, "barber::", op, ": expected scores to be 2-D [rows, cols], got shape ",
              scores.sizes());
  TORCH_CHECK(is_score_dtype(scores.scalar_type()), "barber::", op,
              ": expected scores of dtype float32, float16 or bfloat16, got ", dtype_name(scores.scalar_type()));
  TORCH_CHECK(scores.size(1) < (int64_t{1} << 31), "barber::", op, ": expected fewer than 2^31 columns, got ",
              scores.size(1));
}

inline void check_topk(const at::Tensor& scores, int64_t k) {
  check_scores("topk_mask", scores);
  const int64_t cols = scores.size(1);
  TORCH_CHECK(k >= 0 && k <= cols, "barber::topk_mask: expected 0 <= k <= cols=", cols, ", got k=", k);
}

inline void check_nm(const at::Tensor& scores, int64_t n, int64_t m) {
  check_scores("nm_mask", scores);
  TORCH_CHECK(m >= 1, "barber::nm_mask: expected m >= 1, got m=", m);
  TORCH_CHECK(n >= 0 && n <= m, "barber::nm_mask: expected 0 <= n <= m=", m, ", got n=", n);
  TORCH_CHECK(scores.size(1) % m == 0, "barber::nm_mask: expected the number of columns to be divisible by m=", m,
              ", got ", scores.size(1));
}

inline void check_rebuild(const at::Tensor& scores, const at::Tensor& mask, double ratio, int64_t m) {
  check_scores("rebuild_mask", scores);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "barber::rebuild_mask: expected mask of dtype torch.bool, got ",
              dtype_name(mask.scalar_type()));
  TORCH_CHECK(mask.sizes() == scores.sizes(), "barber::rebuild_mask: expected mask of the shape of scores ",
              scores.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == scores.device(), "barber::rebuild_mask: expected mask on the device of scores (",
              scores.device(), "), got ", mask.device());
  TORCH_CHECK(ratio >= 0.0 && ratio <= 1.0, "barber::rebuild_mask: expected 0 <= ratio <= 1, got ratio=",
              float_repr(ratio));
  TORCH_CHECK(m >= 0, "barber::rebuild_mask: expected m >= 0 (0: unstructured), got m=", m);
  TORCH_CHECK(m == 0 || scores.size(1) % m == 0,
              "barber::rebuild_mask: expected the number of columns to be divisible by m=", m, ", got ",
              scores.size(1));
}

// Turns the error bits that a kernel reported into the op's error (NaN first).
inline void raise_kernel_errors(const char* op, int errors, int64_t m = 0) {
  TORCH_CHECK(!(errors & core::kErrorNaN), "barber::", op, ": scores contain NaN");
  TORCH_CHECK(!(errors & core::kErrorNmMask), "barber::", op,
              ": expected an N:M mask that keeps the same number of entries in every group of m=", m, " columns");
  TORCH_CHECK(!(errors & core::kErrorNmOverflow), "barber::", op, ": a group of m=", m,
              " columns regrows more entries than it kept; lower the ratio, or keep n >= m - n per group");
}

}  // namespace checks
}  // namespace barber
