#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace esvit {
namespace {

bool cpu_has_avx512() {
#ifdef ESVIT_HAVE_AVX512
  __builtin_cpu_init();   // libgcc also checks that the OS saves the zmm and mask registers
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

std::atomic<int> chosen{-1};   // a CpuIsa, or -1 before the first use

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

void set_from(const std::string& name, const char* source) {
  const std::vector<std::string> ok = supported_cpu_isas();
  CpuIsa isa;
  if (name == "auto") {
    isa = cpu_has_avx512() ? CpuIsa::avx512 : CpuIsa::base;
  } else if (name == cpu_isa_name(CpuIsa::base)) {
    isa = CpuIsa::base;
  } else {
    TORCH_CHECK(name == "avx512" && cpu_has_avx512(), source, ": CPU instruction set '", name,
                "' is not available here; expected auto or one of: ", joined(ok));
    isa = CpuIsa::avx512;
  }
  chosen.store(static_cast<int>(isa));
}

}  // namespace

std::string cpu_isa_name(CpuIsa isa) {
  if (isa == CpuIsa::avx512) return "avx512";
#if defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names{cpu_isa_name(CpuIsa::base)};
  if (cpu_has_avx512()) names.push_back(cpu_isa_name(CpuIsa::avx512));
  return names;
}

CpuIsa cpu_isa() {
  if (chosen.load() < 0) {
    const char* env = std::getenv("ESVIT_CPU_ISA");
    set_from(env && *env ? env : "auto", "ESVIT_CPU_ISA");
  }
  return static_cast<CpuIsa>(chosen.load());
}

void set_cpu_isa(const std::string& name) { set_from(name, "set_cpu_isa"); }

int l1d_ways() {
#ifdef _SC_LEVEL1_DCACHE_ASSOC
  static const int ways = static_cast<int>(std::max(0L, sysconf(_SC_LEVEL1_DCACHE_ASSOC)));
  return ways;
#else
  return 0;
#endif
}

}  // namespace esvit
