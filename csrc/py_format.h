// How error messages spell dtypes and floats: exactly as Python prints them, so that the
// native checks (mask_checks.h, pack_checks.h) raise the messages of barber/reference.py
// and the fakes in barber/ops.py, character for character.
#pragma once

#include <c10/core/ScalarType.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace barber {

// "torch.float32"-style name, as Python prints a torch.dtype (at::ScalarType prints "Float").
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// Python's repr() of a float: the shortest digits that read back as `v`, in fixed notation
// for 1e-4 <= |v| < 1e16 (with ".0" when integral) and as d.ddde+XX otherwise; "nan", "inf".
// (A stream prints 6 significant digits: 2.0 as "2" and 1.0000001 as "1".)
inline std::string float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  // buf is [-]d[.ddd]e(+|-)XX
  std::string s(buf);
  const bool negative = s[0] == '-';
  if (negative) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exponent = std::atoi(s.c_str() + e + 1);
  std::string digits = s.substr(0, 1) + (e > 2 ? s.substr(2, e - 2) : "");
  std::string out;
  if (exponent < -4 || exponent >= 16) {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    std::snprintf(buf, sizeof(buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += buf;
  } else if (exponent < 0) {
    out = "0." + std::string(-exponent - 1, '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exponent + 1) {
    out = digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
  }
  return negative ? "-" + out : out;
}

}  // namespace barber
