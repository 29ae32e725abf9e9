// Dtype dispatch shared by the CPU and CUDA implementations of the ops.
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda with scalar_t bound to float, at::Half or at::BFloat16 (the score dtypes of
// the mask ops; mask_checks.h rejects any other dtype first).
#define BARBER_DISPATCH_SCORES(TYPE, NAME, ...)                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
