// Helpers of the C++ examples: a comparison that prints one line per check and counts failures,
// and the exit status.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <exception>
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

// Runs an example's body and returns its exit status. An error it throws (a missing or wrong model
// file, an op refusing its input: c10::Error, a std::exception) is printed and gives status 1, as a
// server catches it (README, "Deploy without Python"), rather than std::terminate's abort.
template <typename Body>
int run_main(const char* program, Body&& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
  }
  return 1;
}

}  // namespace miss_example
