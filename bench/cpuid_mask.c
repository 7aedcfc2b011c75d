/* LD_PRELOAD shim: this process (and every thread it starts) sees a CPU without some SIMD features.
 *
 * Runtimes pick their kernels from CPUID at run time (XNNPACK and torch through cpuinfo, onnxruntime's
 * MLAS, oneDNN, numpy). With CPUID faulting on (Linux arch_prctl ARCH_SET_CPUID, x86 CPUs that list
 * `cpuid_fault`), each CPUID instruction traps; the SIGSEGV handler below runs the real CPUID and
 * clears the feature bits of the profile named by MOBILELLM_CPUID_MASK before the program sees them.
 * So the bench times the kernels an older CPU would run, on this machine's cores and memory.
 *
 *   avx2            Haswell..Zen 2 class: AVX2 + FMA + F16C; no AVX-512, no VNNI of any kind, no AMX
 *   avx512-no-vnni  Skylake-SP/X class: AVX-512 F/CD/BW/DQ/VL; no VNNI (512 or VEX), BF16, VBMI, IFMA, AMX
 *
 * The setting is per thread, inherited by threads and fork()ed children, and reset by execve (where this
 * library is preloaded again). A program that installs a SIGSEGV handler of its own after this one (a JVM,
 * Python's faulthandler) takes the traps away from it: the bench runs neither. MOBILELLM_CPUID_COUNT=1
 * prints the number of trapped CPUIDs at exit. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

struct mask {
    uint32_t leaf7_ebx, leaf7_ecx, leaf7_edx, leaf7_1_eax, leaf7_1_edx, leafd_eax;
};

/* leaf 7.0 EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
#define AVX512_EBX (BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31))
/* leaf 7.0 ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
#define AVX512_ECX (BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14))
/* leaf 7.0 EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24, AMX-INT8 25 */
#define AVX512_EDX (BIT(2) | BIT(3) | BIT(8) | BIT(23))
#define AMX_EDX (BIT(22) | BIT(24) | BIT(25))
/* leaf 7.1 EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23 */
#define NEWER_7_1_EAX (BIT(4) | BIT(5) | BIT(21) | BIT(23))
/* leaf 7.1 EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX-VNNI-INT16 10, AVX10 19 */
#define NEWER_7_1_EDX (BIT(4) | BIT(5) | BIT(8) | BIT(10) | BIT(19))
/* leaf 0xD.0 EAX: XSAVE state components the CPU supports: AVX-512 5-7, AMX 17-18 */
#define AVX512_XSTATE (BIT(5) | BIT(6) | BIT(7))
#define AMX_XSTATE (BIT(17) | BIT(18))

static const struct mask AVX2 = {AVX512_EBX, AVX512_ECX, AVX512_EDX | AMX_EDX, NEWER_7_1_EAX, NEWER_7_1_EDX,
                                 AVX512_XSTATE | AMX_XSTATE};
static const struct mask AVX512_NO_VNNI = {BIT(21), AVX512_ECX, AVX512_EDX | AMX_EDX, NEWER_7_1_EAX,
                                           NEWER_7_1_EDX, AMX_XSTATE};

static struct mask active;
static volatile unsigned long trapped;

static void set_cpuid_faulting(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void emulate_cpuid(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: let it kill the process as it would have */
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    set_cpuid_faulting(0);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
    set_cpuid_faulting(1);
    if (leaf == 7 && sub == 0) {
        b &= ~active.leaf7_ebx;
        c &= ~active.leaf7_ecx;
        d &= ~active.leaf7_edx;
    } else if (leaf == 7 && sub == 1) {
        a &= ~active.leaf7_1_eax;
        d &= ~active.leaf7_1_edx;
    } else if (leaf == 0xd && sub == 0) {
        a &= ~active.leafd_eax;
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
    trapped++;
}

static void report(void) { fprintf(stderr, "cpuid_mask: %lu CPUID instructions trapped\n", trapped); }

__attribute__((constructor)) static void install(void) {
    const char *profile = getenv("MOBILELLM_CPUID_MASK");
    if (!profile || !*profile) return;
    if (!strcmp(profile, "avx2")) {
        active = AVX2;
    } else if (!strcmp(profile, "avx512-no-vnni")) {
        active = AVX512_NO_VNNI;
    } else {
        fprintf(stderr, "cpuid_mask: unknown MOBILELLM_CPUID_MASK=%s (avx2, avx512-no-vnni)\n", profile);
        _exit(2);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = emulate_cpuid;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "cpuid_mask: this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo)\n");
        _exit(2);
    }
    const char *count = getenv("MOBILELLM_CPUID_COUNT");
    if (count && *count == '1') atexit(report);
}
