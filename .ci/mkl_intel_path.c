/* CI only: answers oneMKL's CPU-vendor check as "Intel", so that MKL runs the kernels it runs on an Intel CPU with
 * the same instruction set (on AMD it takes its AVX2 code path even where the CPU has AVX-512). Preloaded into the
 * second test pass on AMD hosts (.ci/run), it puts the suite through MKL's AVX-512 GEMMs, the kernels of the Intel
 * Xeon where the suite once failed, on whatever AVX-512 CPU CI draws. MKL still reads every instruction-set
 * feature (AVX-512, AMX, ...) from the CPU itself, so it never runs an instruction the CPU lacks. PyTorch's
 * libtorch_cpu exports both symbols and calls them through its dynamic symbol table (checked with MKL_VERBOSE). */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
