// CKVM: the parts of the Linux KVM API that Swift cannot import directly.
//
// The ioctl request codes are function-like macros (_IO, _IOW, ...), so they
// are exported here as constants; `ioctl` is variadic, so fixed-arity wrappers
// are provided. Everything is prefixed `ckvm_`/`CKVM_`.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <sys/types.h>

// MARK: constants newer than some installed kernel headers
// KVM_X86_QUIRK_SLOT_ZAP_ALL (Linux 6.12, asm/kvm.h): deleting a memslot zaps
// every shadow page; disabled through KVM_CAP_DISABLE_QUIRKS2.
#ifndef KVM_X86_QUIRK_SLOT_ZAP_ALL
#define KVM_X86_QUIRK_SLOT_ZAP_ALL (1 << 7)
#endif

// MARK: ioctl request codes (system fd)
extern const unsigned long CKVM_GET_API_VERSION;
extern const unsigned long CKVM_CREATE_VM;
extern const unsigned long CKVM_CHECK_EXTENSION;
extern const unsigned long CKVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long CKVM_GET_SUPPORTED_CPUID;
extern const unsigned long CKVM_GET_MSR_INDEX_LIST;

// MARK: ioctl request codes (VM fd)
extern const unsigned long CKVM_CREATE_VCPU;
extern const unsigned long CKVM_SET_USER_MEMORY_REGION;
extern const unsigned long CKVM_GET_DIRTY_LOG;
extern const unsigned long CKVM_SET_TSS_ADDR;
extern const unsigned long CKVM_SET_IDENTITY_MAP_ADDR;
extern const unsigned long CKVM_CREATE_IRQCHIP;
extern const unsigned long CKVM_CREATE_PIT2;
extern const unsigned long CKVM_IRQ_LINE;
extern const unsigned long CKVM_IRQFD;
extern const unsigned long CKVM_IOEVENTFD;
extern const unsigned long CKVM_REGISTER_COALESCED_MMIO;
extern const unsigned long CKVM_UNREGISTER_COALESCED_MMIO;
extern const unsigned long CKVM_ENABLE_CAP;

// MARK: ioctl request codes (vCPU fd)
extern const unsigned long CKVM_RUN;
extern const unsigned long CKVM_GET_REGS;
extern const unsigned long CKVM_SET_REGS;
extern const unsigned long CKVM_GET_SREGS;
extern const unsigned long CKVM_SET_SREGS;
extern const unsigned long CKVM_GET_FPU;
extern const unsigned long CKVM_SET_FPU;
extern const unsigned long CKVM_GET_XSAVE;
extern const unsigned long CKVM_SET_XSAVE;
extern const unsigned long CKVM_GET_MSRS;
extern const unsigned long CKVM_SET_MSRS;
extern const unsigned long CKVM_SET_CPUID2;
extern const unsigned long CKVM_GET_LAPIC;
extern const unsigned long CKVM_SET_LAPIC;
extern const unsigned long CKVM_GET_VCPU_EVENTS;
extern const unsigned long CKVM_SET_VCPU_EVENTS;
extern const unsigned long CKVM_TRANSLATE;
extern const unsigned long CKVM_SET_GUEST_DEBUG;

// MARK: capability numbers (KVM_CHECK_EXTENSION, KVM_ENABLE_CAP) and their flags
extern const unsigned int CKVM_CAP_COALESCED_MMIO;
extern const unsigned int CKVM_CAP_SYNC_REGS;
extern const unsigned int CKVM_CAP_X86_USER_SPACE_MSR;
extern const unsigned int CKVM_CAP_EXIT_ON_EMULATION_FAILURE;
extern const unsigned int CKVM_CAP_NR_MEMSLOTS;
extern const unsigned int CKVM_CAP_DISABLE_QUIRKS2;
/// KVM_CAP_DISABLE_QUIRKS2's bit for zap-all-shadow-pages-on-memslot-delete.
extern const unsigned long long CKVM_X86_QUIRK_SLOT_ZAP_ALL;
/// KVM_CAP_X86_USER_SPACE_MSR's argument: exit on accesses to MSRs KVM does not know.
extern const unsigned int CKVM_MSR_EXIT_REASON_UNKNOWN;

// MARK: fixed-arity ioctl wrappers. Each returns the ioctl result; on -1 the
// caller reads errno through ckvm_errno().
int ckvm_ioctl_none(int fd, unsigned long request);
int ckvm_ioctl_int(int fd, unsigned long request, unsigned long arg);
int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg);
int ckvm_errno(void);
/// The symbolic name of an errno value ("EISDIR"), or NULL when the C library does not know it.
const char *ckvm_errno_name(int e);

// MARK: kvm_run helpers
/// Atomically store `value` into `run->immediate_exit` (safe from any thread).
void ckvm_store_immediate_exit(struct kvm_run *run, uint8_t value);
/// Atomically load `run->immediate_exit`.
uint8_t ckvm_load_immediate_exit(struct kvm_run *run);

// MARK: kicking a vCPU thread out of KVM_RUN
/// The signal used to kick vCPU threads (SIGRTMIN + 1). Installs, once, a
/// handler that does nothing and no SA_RESTART, so a blocking KVM_RUN returns
/// with EINTR.
int ckvm_install_kick_handler(void);
/// Unblock the kick signal in the calling thread (threads inherit their
/// creator's mask, which may block it). Returns 0 or an errno value.
int ckvm_unblock_kick_signal(void);
/// Send the kick signal to `thread`. Returns 0 or an errno value.
int ckvm_kick_thread(pthread_t thread);

// MARK: atomic access to memory shared with the guest
static inline uint32_t ckvm_load_acquire_u32(const void *p) {
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}
static inline void ckvm_store_release_u32(void *p, uint32_t v) {
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}
static inline uint64_t ckvm_load_acquire_u64(const void *p) {
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}
static inline void ckvm_store_release_u64(void *p, uint64_t v) {
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}
/// A locked compare-and-exchange of the naturally aligned 8-byte word at `p`
/// (`lock cmpxchg` on x86): if it holds `*expected`, store `desired` and
/// return 1; otherwise load its value into `*expected` and return 0.
/// Sequentially consistent.
static inline int ckvm_compare_exchange_u64(void *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
/// A full memory fence.
static inline void ckvm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/// A spin-wait hint (`pause` on x86).
static inline void ckvm_spin_hint(void) { __builtin_ia32_pause(); }
/// A serializing instruction (`cpuid`): the calling CPU discards anything it
/// prefetched, so guest code another thread rewrote is fetched anew
/// (cross-modifying code, Intel SDM vol. 3, 9.1.3).
static inline void ckvm_serialize(void) {
    uint32_t a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
}

// MARK: per-thread tag: which VM, if any, the calling thread runs a vCPU of
void ckvm_set_thread_tag(uintptr_t tag);
uintptr_t ckvm_thread_tag(void);

// MARK: host CPU affinity of the calling thread (sched_getaffinity/sched_setaffinity need _GNU_SOURCE)
/// Fills `mask` (`words` 64-bit words, CPU n at bit n % 64 of word n / 64) with the calling thread's
/// allowed CPUs. Returns 0 or an errno.
int ckvm_get_affinity(uint64_t *mask, size_t words);
/// Restricts the calling thread to the CPUs set in `mask` (as above). Returns 0 or an errno.
int ckvm_set_affinity(const uint64_t *mask, size_t words);

// MARK: timing
/// The time-stamp counter (for in-process benchmarks of the exit path).
static inline uint64_t ckvm_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

// MARK: offsets into kvm_run that Swift cannot compute through anonymous unions.
size_t ckvm_run_size(void);
/// offsetof(struct kvm_run, mmio.data)
extern const size_t CKVM_RUN_MMIO_DATA_OFFSET;
/// offsetof(struct kvm_run, msr.data)
extern const size_t CKVM_RUN_MSR_DATA_OFFSET;
/// offsetof(struct kvm_run, msr.error)
extern const size_t CKVM_RUN_MSR_ERROR_OFFSET;
/// offsetof(struct kvm_run, s.regs.regs)
extern const size_t CKVM_RUN_SYNC_REGS_OFFSET;
/// offsetof(struct kvm_run, s.regs.sregs)
extern const size_t CKVM_RUN_SYNC_SREGS_OFFSET;

#endif
