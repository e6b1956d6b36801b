#include "impl_choice.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <string>

namespace miss_ext {
namespace {

int read_choice(const char* variable, std::initializer_list<const char*> options) {
  const char* value = std::getenv(variable);
  if (value == nullptr || value[0] == '\0') return choice::kAuto;
  const std::string v(value);
  if (v == "auto") return choice::kAuto;
  int index = 1;
  std::string known = "auto";
  for (const char* option : options) {
    if (v == option) return index;
    ++index;
    known += std::string(", ") + option;
  }
  TORCH_CHECK_VALUE(false, "miss: environment variable ", variable, " must be one of ", known, "; got '", v, "'");
  return choice::kAuto;  // not reached
}

}  // namespace

int gemm_choice() { return read_choice("MISS_EXT_GEMM", {"fp32", "split"}); }

int bat_transform_choice() { return read_choice("MISS_EXT_BAT_TRANSFORM", {"kernel", "gemm"}); }

int fold_kernel_choice() { return read_choice("MISS_EXT_FOLD_KERNEL", {"columns", "rows", "warp"}); }

int tile_add_kernel_choice() { return read_choice("MISS_EXT_TILE_ADD_KERNEL", {"flat", "grid2d"}); }

int adapter_term_choice() { return read_choice("MISS_EXT_ADAPTER_TERM", {"after", "before"}); }

int cpu_isa_choice() { return read_choice("MISS_EXT_CPU_ISA", {"baseline", "avx2", "avx512"}); }

}  // namespace miss_ext
