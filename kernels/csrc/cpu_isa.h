// Which vector instruction set the CPU kernels run with, chosen at run time: the extension is built for the
// baseline (-mavx2 -mfma on x86_64) and carries AVX-512 variants of the hot loops, used where the CPU has
// AVX-512 F/DQ/BW/VL (2x the FMA throughput of AVX2 on Zen 4/5 and Intel server cores).
// ESVIT_CPU_ISA=auto|avx2|avx512 (read at first use) or set_cpu_isa() picks one; asking for one the CPU or the
// build lacks is an error naming it.
#pragma once
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define ESVIT_HAVE_AVX512 1
// what the AVX-512 variants are compiled for (on top of the build's flags)
#define ESVIT_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#endif

namespace esvit {

enum class CpuIsa { base, avx512 };   // base: the build's own flags ("avx2" on x86_64, "generic" without them)

CpuIsa cpu_isa();                                  // the one in use
std::string cpu_isa_name(CpuIsa isa);
std::vector<std::string> supported_cpu_isas();     // this CPU and build, best last
void set_cpu_isa(const std::string& name);         // "auto" or one of supported_cpu_isas()

int l1d_ways();   // associativity of the L1 data cache (sysconf), 0 when the system does not say

}  // namespace esvit
