// The ranking rule shared by every barber selection (reference: barber/reference.py).
//
// Total order: a higher score ranks first; among equal scores the lower column index ranks
// first. "Keep k" keeps the first k in this order, "the worst" is the last (the lowest
// score, among equal scores the HIGHER column index). Scores are compared as floats:
// -0.0 equals +0.0 (so they tie, and the index decides), +inf and -inf are ordinary values,
// and NaN is an error that the caller reports ("barber::<op>: scores contain NaN").
//
// Every kernel ranks on order keys: an unsigned integer per score with
//   key(a) > key(b)  <=>  a > b   and   key(a) == key(b)  <=>  a == b   (a, b not NaN),
// made from the raw IEEE bits: -0.0 is first mapped to +0.0, then a negative number has
// all bits flipped and a non-negative one gets its sign bit set. float32 gives 32-bit keys,
// float16 and bfloat16 give 16-bit keys (their bits are sign-magnitude like float32).
//
// Torch-free and header-only; host and device.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/macros.h"

namespace barber {
namespace core {

// Bit set by a kernel that met a NaN score (see also the N:M flags in core/rebuild.h).
constexpr int kErrorNaN = 1;

// Score formats: the raw bits type (= the key type), the sign bit and +inf.
struct Fp32 {
  using Bits = uint32_t;
  static constexpr Bits kSign = 0x80000000u;
  static constexpr Bits kInf = 0x7F800000u;
};
struct Fp16 {
  using Bits = uint16_t;
  static constexpr Bits kSign = 0x8000u;
  static constexpr Bits kInf = 0x7C00u;
};
struct Bf16 {
  using Bits = uint16_t;
  static constexpr Bits kSign = 0x8000u;
  static constexpr Bits kInf = 0x7F80u;
};

template <class F>
BARBER_HOST_DEVICE constexpr bool is_nan(typename F::Bits bits) {
  return static_cast<typename F::Bits>(bits & static_cast<typename F::Bits>(~F::kSign)) > F::kInf;
}

// Order-preserving unsigned key of a (non-NaN) score given by its raw bits. Branch-free:
// a negative score has all bits flipped, a non-negative one its sign bit set.
template <class F>
BARBER_HOST_DEVICE constexpr typename F::Bits order_key(typename F::Bits bits) {
  using Bits = typename F::Bits;
  constexpr int kTopBit = 8 * sizeof(Bits) - 1;
  const Bits b = bits == F::kSign ? Bits{0} : bits;  // -0.0 ranks as +0.0
  const Bits flip = static_cast<Bits>(static_cast<Bits>(0u - static_cast<Bits>(b >> kTopBit)) | F::kSign);
  return static_cast<Bits>(b ^ flip);
}

// The same order as a signed integer (key with the sign bit flipped): host loops compare
// these, because SSE2 vectorises signed compares and not unsigned ones.
template <class F>
BARBER_HOST_DEVICE constexpr std::make_signed_t<typename F::Bits> signed_order_key(typename F::Bits bits) {
  using Bits = typename F::Bits;
  return static_cast<std::make_signed_t<Bits>>(static_cast<Bits>(order_key<F>(bits) ^ F::kSign));
}

// Whether entry a (key ka, column ia) ranks before entry b in the total order.
template <class Key, class Index>
BARBER_HOST_DEVICE constexpr bool ranks_before(Key ka, Index ia, Key kb, Index ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// Whether entry a is worse than entry b (ranks after it): the reverse of ranks_before.
template <class Key, class Index>
BARBER_HOST_DEVICE constexpr bool ranks_after(Key ka, Index ia, Key kb, Index ib) {
  return ka < kb || (ka == kb && ia > ib);
}

}  // namespace core
}  // namespace barber
