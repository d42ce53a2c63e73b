#define _GNU_SOURCE // strerrorname_np
#include "CKVM.h"
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>

const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;

const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
const unsigned long CKVM_IRQ_LINE = KVM_IRQ_LINE;
const unsigned long CKVM_IRQFD = KVM_IRQFD;
const unsigned long CKVM_IOEVENTFD = KVM_IOEVENTFD;
const unsigned long CKVM_REGISTER_COALESCED_MMIO = KVM_REGISTER_COALESCED_MMIO;
const unsigned long CKVM_UNREGISTER_COALESCED_MMIO = KVM_UNREGISTER_COALESCED_MMIO;
const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;

const unsigned long CKVM_RUN = KVM_RUN;
const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
const unsigned long CKVM_TRANSLATE = KVM_TRANSLATE;
const unsigned long CKVM_SET_GUEST_DEBUG = KVM_SET_GUEST_DEBUG;

const unsigned int CKVM_CAP_COALESCED_MMIO = KVM_CAP_COALESCED_MMIO;
const unsigned int CKVM_CAP_SYNC_REGS = KVM_CAP_SYNC_REGS;
const unsigned int CKVM_CAP_X86_USER_SPACE_MSR = KVM_CAP_X86_USER_SPACE_MSR;
const unsigned int CKVM_CAP_EXIT_ON_EMULATION_FAILURE = KVM_CAP_EXIT_ON_EMULATION_FAILURE;
const unsigned int CKVM_CAP_NR_MEMSLOTS = KVM_CAP_NR_MEMSLOTS;
const unsigned int CKVM_CAP_DISABLE_QUIRKS2 = KVM_CAP_DISABLE_QUIRKS2;
const unsigned long long CKVM_X86_QUIRK_SLOT_ZAP_ALL = KVM_X86_QUIRK_SLOT_ZAP_ALL;
const unsigned int CKVM_MSR_EXIT_REASON_UNKNOWN = KVM_MSR_EXIT_REASON_UNKNOWN;

int ckvm_ioctl_none(int fd, unsigned long request) { return ioctl(fd, request, 0); }
int ckvm_ioctl_int(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int ckvm_errno(void) { return errno; }
const char *ckvm_errno_name(int e) { return strerrorname_np(e); }

void ckvm_store_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}
uint8_t ckvm_load_immediate_exit(struct kvm_run *run) {
    return __atomic_load_n(&run->immediate_exit, __ATOMIC_SEQ_CST);
}

static void ckvm_kick_handler(int sig) { (void)sig; }

int ckvm_install_kick_handler(void) {
    static int installed = 0;
    if (__atomic_load_n(&installed, __ATOMIC_ACQUIRE)) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ckvm_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    if (sigaction(SIGRTMIN + 1, &sa, NULL) != 0) return errno;
    __atomic_store_n(&installed, 1, __ATOMIC_RELEASE);
    return 0;
}

int ckvm_unblock_kick_signal(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN + 1);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int ckvm_kick_thread(pthread_t thread) { return pthread_kill(thread, SIGRTMIN + 1); }

static __thread uintptr_t ckvm_tag;
void ckvm_set_thread_tag(uintptr_t tag) { ckvm_tag = tag; }
uintptr_t ckvm_thread_tag(void) { return ckvm_tag; }

#include <sched.h>
int ckvm_get_affinity(uint64_t *mask, size_t words) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return errno;
    for (size_t w = 0; w < words; w++) mask[w] = 0;
    for (size_t c = 0; c < CPU_SETSIZE && c / 64 < words; c++)
        if (CPU_ISSET(c, &set)) mask[c / 64] |= (uint64_t)1 << (c % 64);
    return 0;
}
int ckvm_set_affinity(const uint64_t *mask, size_t words) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (size_t c = 0; c < CPU_SETSIZE && c / 64 < words; c++)
        if (mask[c / 64] & ((uint64_t)1 << (c % 64))) CPU_SET(c, &set);
    return sched_setaffinity(0, sizeof set, &set) == 0 ? 0 : errno;
}

size_t ckvm_run_size(void) { return sizeof(struct kvm_run); }

#include <stddef.h>
const size_t CKVM_RUN_MMIO_DATA_OFFSET = offsetof(struct kvm_run, mmio.data);
const size_t CKVM_RUN_MSR_DATA_OFFSET = offsetof(struct kvm_run, msr.data);
const size_t CKVM_RUN_MSR_ERROR_OFFSET = offsetof(struct kvm_run, msr.error);
const size_t CKVM_RUN_SYNC_REGS_OFFSET = offsetof(struct kvm_run, s.regs.regs);
const size_t CKVM_RUN_SYNC_SREGS_OFFSET = offsetof(struct kvm_run, s.regs.sregs);
