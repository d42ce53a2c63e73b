// exitfloor: the whole-exit floor without VMMKit. Boots a workload image of
// Guests/ (ELF64 with the PVH note) the way X86Boot does (64 MiB in one slot,
// the same GDT, hvm_start_info, command line, CPUID and entry registers) and
// runs a bare KVM_RUN loop: the UART line-status read answers "THR empty",
// THR bytes are kept (to print the guest's RESULT line), the debug-exit port
// ends the run, everything else is dropped.
//
//   cc -O2 -o exitfloor exitfloor.c
//   ./exitfloor Guests/uart-cpl3.elf iters=200 [nosync]
//
// Prints the guest's RESULT line and "exits=N" (exits between the phase marks).
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>

static unsigned long MEM = 64ul << 20;
#define CHECK(x) do { if ((x) < 0) { perror(#x); exit(1); } } while (0)

static uint64_t pvh_entry(const uint8_t *img, size_t n) {
    const Elf64_Ehdr *eh = (const void *)img;
    for (int i = 0; i < eh->e_phnum; i++) {
        const Elf64_Phdr *ph = (const void *)(img + eh->e_phoff + (size_t)i * eh->e_phentsize);
        if (ph->p_type != PT_NOTE) continue;
        size_t off = ph->p_offset, end = ph->p_offset + ph->p_filesz;
        while (off + 12 <= end && end <= n) {
            const uint32_t *h = (const void *)(img + off);
            size_t name = (h[0] + 3) & ~3u, desc = (h[1] + 3) & ~3u;
            if (h[2] == 18 && h[0] == 4 && !memcmp(img + off + 12, "Xen", 4))
                return *(const uint32_t *)(img + off + 12 + name);
            off += 12 + name + desc;
        }
    }
    fprintf(stderr, "no PVH note\n");
    exit(1);
}

static int has(int argc, char **argv, const char *opt) {
    for (int i = 3; i < argc; i++) if (!strcmp(argv[i], opt)) return 1;
    return 0;
}

static volatile int done;
static void *ticker(void *arg) {
    (void)arg;
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    while (!done) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_nsec += 10000000;
        if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
        pthread_mutex_lock(&m);
        pthread_cond_timedwait(&c, &m, &t);
        pthread_mutex_unlock(&m);
    }
    return 0;
}

static int cpu;
static struct kvm_run *run;
static void *loop(void *arg);

static void onsig(int s) { (void)s; }
static int run_tiny(int vm, int kvm, uint8_t *mem, int argc, char **argv);

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s IMAGE CMDLINE [nosync] [thread] [timer] [signal]\n", argv[0]); return 2; }
    int sync = !has(argc, argv, "nosync");
    for (int i = 3; i < argc; i++) if (!strncmp(argv[i], "mem=", 4)) MEM = strtoul(argv[i] + 4, 0, 0) << 20;
    int tiny = !strcmp(argv[1], "tiny");
    struct stat st = { 0 };
    uint8_t *img = 0;
    if (!tiny) {
        int fd = open(argv[1], O_RDONLY);
        CHECK(fd);
        CHECK(fstat(fd, &st));
        img = malloc(st.st_size);
        if (read(fd, img, st.st_size) != st.st_size) { perror("read"); return 1; }
        close(fd);
    }

    int kvm = open("/dev/kvm", O_RDWR);
    CHECK(kvm);
    int vm;
    while ((vm = ioctl(kvm, KVM_CREATE_VM, 0)) < 0 && (errno == EINTR)) {}
    CHECK(vm);
    uint8_t *mem = mmap(0, MEM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    struct kvm_userspace_memory_region slot = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM, .userspace_addr = (uint64_t)mem };
    CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot));
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul);

    if (tiny) return run_tiny(vm, kvm, mem, argc, argv);
    // Image.
    const Elf64_Ehdr *eh = (const void *)img;
    for (int i = 0; i < eh->e_phnum; i++) {
        const Elf64_Phdr *ph = (const void *)(img + eh->e_phoff + (size_t)i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD) continue;
        memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
        memset(mem + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
    }
    uint32_t entry = (uint32_t)pvh_entry(img, st.st_size);

    // Platform tables as X86Boot writes them: GDT, hvm_start_info, memory map, command line.
    uint64_t gdt[4] = { 0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00cf9b000000ffff };
    memcpy(mem + 0x500, gdt, sizeof gdt);
    uint32_t *si = (void *)(mem + 0x7000);
    si[0] = 0x336ec578; si[1] = 1;
    *(uint64_t *)(mem + 0x7000 + 24) = 0x8000;
    *(uint64_t *)(mem + 0x7000 + 40) = 0x7100;
    uint64_t map[][3] = { { 0, 0x9fc00, 1 }, { 0x9fc00, 0x100000 - 0x9fc00, 2 }, { 0x100000, 0xe00000 - 0x100000, 1 },
                          { 0xe00000, 0x200000, 2 }, { 0x1000000, MEM - 0x1000000, 1 } };
    *(uint32_t *)(mem + 0x7000 + 48) = 5;
    for (int i = 0; i < 5; i++) {
        *(uint64_t *)(mem + 0x7100 + i * 24) = map[i][0];
        *(uint64_t *)(mem + 0x7100 + i * 24 + 8) = map[i][1];
        *(uint32_t *)(mem + 0x7100 + i * 24 + 16) = (uint32_t)map[i][2];
    }
    strcpy((char *)mem + 0x8000, argv[2]);

    cpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK(cpu);
    int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    run = mmap(0, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };
    CHECK(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid));
    for (unsigned i = 0; i < cpuid.c.nent; i++) {
        struct kvm_cpuid_entry2 *e = &cpuid.e[i];
        if (e->function == 1) { e->ebx = (e->ebx & 0xffff) | (1 << 16); e->ecx |= 1u << 31; }
        if (e->function == 0xb || e->function == 0x1f) e->edx = 0;
    }
    CHECK(ioctl(cpu, KVM_SET_CPUID2, &cpuid));
    struct kvm_sregs s;
    CHECK(ioctl(cpu, KVM_GET_SREGS, &s));
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x18, .type = 0xb, .present = 1, .db = 1, .s = 1, .g = 1 };
    struct kvm_segment data = code;
    data.selector = 0x10; data.type = 0x3;
    s.cs = code; s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = 0x500; s.gdt.limit = 31;
    s.idt.base = 0; s.idt.limit = 0;
    s.tr = (struct kvm_segment){ .type = 11, .limit = 0x67, .present = 1 };
    s.ldt = (struct kvm_segment){ .type = 2, .limit = 0xffff, .present = 1 };
    s.cr0 = 0x11; s.cr3 = 0; s.cr4 = 0; s.efer = 0;
    CHECK(ioctl(cpu, KVM_SET_SREGS, &s));
    struct kvm_regs r = { .rip = entry, .rbx = 0x7000, .rflags = 2 };
    CHECK(ioctl(cpu, KVM_SET_REGS, &r));
    if (sync) run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    if (has(argc, argv, "signal")) {
        struct sigaction sa = { .sa_handler = onsig };
        sigaction(SIGRTMIN + 1, &sa, 0);
    }
    pthread_t tk;
    if (has(argc, argv, "timer")) pthread_create(&tk, 0, ticker, 0);
    if (has(argc, argv, "thread")) {
        pthread_t t;
        pthread_create(&t, 0, loop, 0);
        pthread_join(t, 0);
    } else {
        loop(0);
    }
    done = 1;
    return 0;
}

static void *loop(void *arg) {
    (void)arg;

    // TSC cycles of each KVM_RUN by the exit it resumed from (an IN completes on re-entry).
    unsigned long long after_in = 0, after_out = 0, n_in = 0, n_out = 0, t0, t1;
    int last = -1;
    char tail[256];
    unsigned long written = 0, exits = 0, mark1 = 0, mark2 = 0;
    for (;;) {
        t0 = __builtin_ia32_rdtsc();
        if (ioctl(cpu, KVM_RUN, 0) < 0) { if ((errno == EINTR)) continue; perror("KVM_RUN"); exit(1); }
        t1 = __builtin_ia32_rdtsc();
        if (mark1 && !mark2) {
            if (last == 0) { after_in += t1 - t0; n_in++; } else if (last == 1) { after_out += t1 - t0; n_out++; }
        }
        last = run->exit_reason == KVM_EXIT_IO ? run->io.direction == KVM_EXIT_IO_OUT : -1;
        if (run->exit_reason == KVM_EXIT_MMIO) { exits++; continue; }
        if (run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "exit reason %u\n", run->exit_reason); exit(1); }
        exits++;
        uint8_t *d = (uint8_t *)run + run->io.data_offset;
        if (run->io.direction == KVM_EXIT_IO_IN) {
            memset(d, 0xff, run->io.size * run->io.count);
            if (run->io.port == 0x3fd) d[0] = 0x60;
            continue;
        }
        if (run->io.port == 0x3f8) tail[written++ & 255] = (char)d[0];
        else if (run->io.port == 0x700) { if (d[0] == 1) mark1 = exits; else if (d[0] == 2) mark2 = exits; }
        else if (run->io.port == 0xf4) break;
    }
    unsigned long n = written < 256 ? written : 256;
    char text[257];
    for (unsigned long i = 0; i < n; i++) text[i] = tail[(written - n + i) & 255];
    text[n] = 0;
    char *line = strstr(text, "RESULT ");
    printf("%s", line ? line : text);
    printf("exits=%lu\n", mark2 - mark1);
    if (n_in && n_out)
        fprintf(stderr, "image: KVM_RUN after an IN exit: %llu cycles, after an OUT exit: %llu cycles (steady phase means)\n",
                after_in / n_in, after_out / n_out);
    return 0;
}

// A tiny VM: long mode entered directly at CPL3 (no boot code), one 2 MiB
// user page, a TSS whose I/O bitmap allows ports 0-0x7ff, and the per-byte
// sequence of uart_putc in a loop: in 0x3fd until THRE, out 0x3f8; then
// out 0xf4. "iopl3" sets RFLAGS.IOPL = 3 as well.
static int run_tiny(int vm, int kvm, uint8_t *mem, int argc, char **argv) {
    unsigned long iters = strtoul(argv[2] + (strncmp(argv[2], "iters=", 6) ? 0 : 6), 0, 0) * 38;
    uint64_t gdt[8] = { 0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00cff3000000ffff, 0x00affb000000ffff };
    uint64_t tss = 0x3000, tsslim = 0x68 + 0x100;
    gdt[5] = (tsslim & 0xffff) | ((tss & 0xffffff) << 16) | (0x89ull << 40) | (((tsslim >> 16) & 0xf) << 48) | (((tss >> 24) & 0xff) << 56);
    gdt[6] = tss >> 32;
    memcpy(mem + 0x500, gdt, sizeof gdt);
    memset(mem + tss, 0, 0x68 + 0x101);
    *(uint16_t *)(mem + tss + 0x66) = 0x68;      // I/O map base
    mem[tss + 0x68 + 0x100] = 0xff;              // ports 0x800+ denied (bitmap ends)
    *(uint64_t *)(mem + 0x1000) = 0x2000 | 7;    // PML4 -> PDPT
    *(uint64_t *)(mem + 0x2000) = 0x4000 | 7;    // PDPT -> PD
    *(uint64_t *)(mem + 0x4000) = 0x0 | 0x87;    // 2 MiB user page at 0
    uint8_t code[] = { 0xb9, 0, 0, 0, 0, 0xba, 0xfd, 0x03, 0, 0, 0xec, 0xa8, 0x20, 0x74, 0xfb, 0xb0, 0x41,
                       0xba, 0xf8, 0x03, 0, 0, 0xee, 0xff, 0xc9, 0x75, 0xea, 0xba, 0xf4, 0, 0, 0, 0xee, 0xeb, 0xfe };
    memcpy(code + 1, &iters, 4);
    memcpy(mem + 0x10000, code, sizeof code);

    cpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK(cpu);
    int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    run = mmap(0, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };
    CHECK(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid));
    CHECK(ioctl(cpu, KVM_SET_CPUID2, &cpuid));
    struct kvm_sregs s;
    CHECK(ioctl(cpu, KVM_GET_SREGS, &s));
    struct kvm_segment code_seg = { .base = 0, .limit = 0xffffffff, .selector = 0x23, .type = 0xb, .present = 1, .dpl = 3, .l = 1, .s = 1, .g = 1 };
    struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 0x1b, .type = 0x3, .present = 1, .dpl = 3, .db = 1, .s = 1, .g = 1 };
    s.cs = code_seg; s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = 0x500; s.gdt.limit = sizeof gdt - 1;
    s.idt.base = 0; s.idt.limit = 0;
    s.tr = (struct kvm_segment){ .base = tss, .limit = tsslim, .selector = 0x28, .type = 11, .present = 1 };
    s.ldt = (struct kvm_segment){ .type = 2, .limit = 0xffff, .present = 1, .unusable = 1 };
    s.cr0 = 0x80050033; s.cr3 = 0x1000; s.cr4 = 0x620; s.efer = 0x500;
    CHECK(ioctl(cpu, KVM_SET_SREGS, &s));
    struct kvm_regs r = { .rip = 0x10000, .rsp = 0x1f0000, .rflags = has(argc, argv, "iopl3") ? 0x3002 : 2 };
    CHECK(ioctl(cpu, KVM_SET_REGS, &r));
    if (!has(argc, argv, "nosync")) run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    unsigned long long sum_in = 0, sum_out = 0, n_in = 0, n_out = 0, start = 0;
    int last = -1;
    for (unsigned long n = 0;; n++) {
        unsigned long long t0 = __builtin_ia32_rdtsc();
        if (ioctl(cpu, KVM_RUN, 0) < 0) { if (errno == EINTR) continue; perror("KVM_RUN"); exit(1); }
        unsigned long long t1 = __builtin_ia32_rdtsc();
        if (n == 1000) start = t0;
        if (n >= 1000) { if (last == 0) { sum_in += t1 - t0; n_in++; } else if (last == 1) { sum_out += t1 - t0; n_out++; } }
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "tiny: exit reason %u after %lu exits\n", run->exit_reason, n);
            exit(1);
        }
        uint8_t *d = (uint8_t *)run + run->io.data_offset;
        last = run->io.direction == KVM_EXIT_IO_OUT;
        if (!last) { d[0] = run->io.port == 0x3fd ? 0x60 : 0xff; continue; }
        if (run->io.port == 0xf4) {
            printf("tiny: %lu exits, %llu cycles per exit; KVM_RUN after an IN exit: %llu cycles, after an OUT exit: %llu cycles\n",
                   n + 1, (t1 - start) / (n + 1 - 1000), n_in ? sum_in / n_in : 0, n_out ? sum_out / n_out : 0);
            return 0;
        }
    }
}
