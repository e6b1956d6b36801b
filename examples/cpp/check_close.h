// Comparison helper of the C++ examples: prints one line per check and counts failures.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <string>

namespace miss_example {

inline int& failures() {
  static int count = 0;
  return count;
}

// Same kernels and the same data as in Python, so only summation order may differ.
inline void check_close(const std::string& what, const at::Tensor& got, const at::Tensor& want,
                        double rtol = 1e-5, double atol = 1e-6) {
  const bool same_shape = got.defined() && got.sizes() == want.sizes();
  const bool close = same_shape && at::allclose(got, want, rtol, atol);
  const double err = same_shape ? (got - want).abs().max().item<double>() : -1.0;
  std::printf("%-32s %s (max abs diff %.3g)\n", what.c_str(), close ? "ok" : "MISMATCH", err);
  if (!close) {
    ++failures();
  }
}

// Prints OK or FAILED and gives the exit status.
inline int report() {
  std::printf("%s\n", failures() == 0 ? "OK" : "FAILED");
  return failures() == 0 ? 0 : 1;
}

}  // namespace miss_example
