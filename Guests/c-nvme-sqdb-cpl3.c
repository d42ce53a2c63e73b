/* c-nvme-sqdb-cpl3 - an NVMe-shaped submission path on minivmm's doorbell
 * device: CAP read with lo_hi_readq, the doorbell stride from CAP.DSTRD,
 * dev->dbs the doorbell array (here at BAR + 0x40), each queue's doorbell
 * pointer computed as &dev->dbs[qid * 2 * dev->db_stride]; a command copied
 * into the submission queue (64-byte entries in RAM), sq_tail advanced and
 * written with writel(nvmeq->sq_tail, nvmeq->q_db). Completions are polled
 * by phase (the doorbell's completion queue's sequence numbers) and the CQ
 * head doorbell (q_db + db_stride, a register the device ignores) is
 * written once per reaped batch, as nvme_ring_cq_doorbell does.
 * Command line: iters=N (default 4096) warmup=W.
 * RESULT checksum: FNV-1a 32 over the completions' result words. */
#include "c/lib.h"
#include "c/io.h"
#include "c/serial.h"

#define __iomem volatile

#define NVME_REG_CAP 0x0000
#define NVME_REG_ACQ_LO 0x0008 /* the doorbell's completion queue */
#define NVME_REG_ACQ_HI 0x000c
#define NVME_REG_AQA 0x0010
#define NVME_REG_CC 0x0014
#define NVME_REG_CSTS 0x0018 /* the doorbell's ERROR: 0 = fine */
#define NVME_REG_DBS 0x0040
#define NVME_CAP_STRIDE(cap) (((cap) >> 32) & 0xf)

#define Q_DEPTH 64
#define CQ_DEPTH 256
#define BATCH 4

static inline u32 readl(const __iomem void *addr)
{
	u32 v;

	asm volatile("movl %1, %0" : "=r"(v) : "m"(*(const __iomem u32 *)addr) : "memory");
	return v;
}

static inline void writel(u32 v, __iomem void *addr)
{
	asm volatile("movl %0, %1" : : "r"(v), "m"(*(__iomem u32 *)addr) : "memory");
}

static inline u64 lo_hi_readq(const __iomem void *addr)
{
	const __iomem u32 *p = addr;
	u32 low, high;

	low = readl(p);
	high = readl(p + 1);
	return low + ((u64)high << 32);
}

static inline void lo_hi_writeq(u64 val, __iomem void *addr)
{
	writel((u32)val, addr);
	writel((u32)(val >> 32), (__iomem u8 *)addr + 4);
}

struct nvme_command {
	u8 opcode;
	u8 flags;
	u16 command_id;
	u32 nsid;
	u64 rsvd2;
	u64 metadata;
	u64 prp1;
	u64 prp2;
	u32 cdw10[6];
};

struct nvme_completion { /* the doorbell's completion entry */
	u32 result;
	u32 seq; /* phase stand-in: the entry is new when seq == head + 1 + wraps */
};

struct nvme_dev;

struct nvme_queue {
	struct nvme_dev *dev;
	struct nvme_command *sq_cmds;
	volatile struct nvme_completion *cqes;
	u32 __iomem *q_db;
	u32 q_depth;
	u16 cq_vector;
	u16 sq_tail;
	u16 last_sq_tail;
	u16 cq_head;
	u32 cq_seen;
	u16 qid;
};

struct nvme_dev {
	struct nvme_queue *queues;
	u32 __iomem *dbs;
	void __iomem *bar;
	u32 db_stride;
	u64 cap;
	u32 hash;
};

static struct nvme_command sq_mem[Q_DEPTH] __attribute__((aligned(4096)));
static struct nvme_completion cq_mem[CQ_DEPTH] __attribute__((aligned(4096)));
static struct nvme_queue queues[1];
static struct nvme_dev the_dev;

static struct uart_port com1;
static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

static inline void nvme_write_sq_db(struct nvme_queue *nvmeq, bool write_sq)
{
	if (!write_sq) {
		u16 next_tail = nvmeq->sq_tail + 1;

		if (next_tail == nvmeq->q_depth)
			next_tail = 0;
		if (next_tail != nvmeq->last_sq_tail)
			return;
	}
	writel(nvmeq->sq_tail, nvmeq->q_db);
	nvmeq->last_sq_tail = nvmeq->sq_tail;
}

static inline void nvme_sq_copy_cmd(struct nvme_queue *nvmeq, struct nvme_command *cmd)
{
	memcpy(&nvmeq->sq_cmds[nvmeq->sq_tail], cmd, sizeof(*cmd));
	if (++nvmeq->sq_tail == nvmeq->q_depth)
		nvmeq->sq_tail = 0;
}

__attribute__((noinline)) static void nvme_submit_cmd(struct nvme_queue *nvmeq, struct nvme_command *cmd, bool write_sq)
{
	nvme_sq_copy_cmd(nvmeq, cmd);
	nvme_write_sq_db(nvmeq, write_sq);
}

static inline bool nvme_cqe_pending(struct nvme_queue *nvmeq)
{
	return nvmeq->cqes[nvmeq->cq_head].seq == nvmeq->cq_seen + 1;
}

static inline void nvme_ring_cq_doorbell(struct nvme_queue *nvmeq)
{
	writel(nvmeq->cq_head, nvmeq->q_db + nvmeq->dev->db_stride);
}

static int nvme_poll_cq(struct nvme_queue *nvmeq)
{
	int found = 0;

	while (nvme_cqe_pending(nvmeq)) {
		volatile struct nvme_completion *cqe = &nvmeq->cqes[nvmeq->cq_head];
		u32 result = cqe->result;

		found++;
		nvmeq->dev->hash = fnv1a(nvmeq->dev->hash, &result, sizeof(result));
		nvmeq->cq_seen++;
		if (++nvmeq->cq_head == CQ_DEPTH)
			nvmeq->cq_head = 0;
	}
	if (found)
		nvme_ring_cq_doorbell(nvmeq);
	return found;
}

static int nvme_run(struct nvme_dev *dev, unsigned long from, unsigned long to)
{
	struct nvme_queue *nvmeq = &dev->queues[0];
	struct nvme_command c;
	int inflight = 0;

	memset(&c, 0, sizeof(c));
	c.opcode = 0x01; /* nvme_cmd_write */
	c.nsid = 1;
	for (unsigned long j = from; j < to; j++) {
		c.command_id = (u16)j;
		c.cdw10[0] = (u32)j * 2654435761u;
		nvme_submit_cmd(nvmeq, &c, true);
		inflight++;
		if ((j + 1) % BATCH == 0 || j + 1 == to) {
			int want = inflight, got = 0;

			for (int spin = 0; got < want && spin < 1000000; spin++)
				got += nvme_poll_cq(nvmeq);
			if (got != want) {
				printk("nvme: I/O %lu timeout, completion polled\n", j);
				return -1;
			}
			inflight = 0;
		}
	}
	return 0;
}

static int nvme_pci_enable(struct nvme_dev *dev)
{
	unsigned long cq = (unsigned long)cq_mem;
	struct nvme_queue *nvmeq = &queues[0];

	dev->bar = (void __iomem *)0xd0000000UL;
	dev->cap = lo_hi_readq((u8 __iomem *)dev->bar + NVME_REG_CAP);
	if ((u32)dev->cap != 0x4c454244)
		return -19;
	dev->db_stride = 1 << NVME_CAP_STRIDE(dev->cap);
	dev->dbs = (u32 __iomem *)((u8 __iomem *)dev->bar + NVME_REG_DBS);
	dev->queues = queues;
	memset(cq_mem, 0, sizeof(cq_mem));
	nvmeq->dev = dev;
	nvmeq->qid = 0;
	nvmeq->q_depth = Q_DEPTH;
	nvmeq->sq_cmds = sq_mem;
	nvmeq->cqes = cq_mem;
	nvmeq->q_db = &dev->dbs[nvmeq->qid * 2 * dev->db_stride];
	writel(0, (u8 __iomem *)dev->bar + NVME_REG_CC);
	lo_hi_writeq(cq, (u8 __iomem *)dev->bar + NVME_REG_ACQ_LO);
	writel(CQ_DEPTH, (u8 __iomem *)dev->bar + NVME_REG_AQA);
	writel(1, (u8 __iomem *)dev->bar + NVME_REG_CC);
	return readl((u8 __iomem *)dev->bar + NVME_REG_CSTS) == 0 ? 0 : -5;
}

int main(const char *cmdline)
{
	struct nvme_dev *dev = &the_dev;
	struct bench b;

	serial8250_init_port(&com1, 0x3f8, 115200, UPIO_PORT);
	register_console(&serial_console);
	if (nvme_pci_enable(dev)) {
		printk("nvme: Removing after probe failure\n");
		return 2;
	}
	dev->hash = FNV_OFFSET;
	bench_init(&b, "c-nvme-sqdb-cpl3", cmdline, 4096);
	if (nvme_run(dev, 0, b.warmup))
		return 3;
	bench_mark_start(&b);
	if (nvme_run(dev, b.warmup, b.iters))
		return 3;
	bench_mark_end(&b);
	printk("nvme: stride %u sq_tail %u cq_head %u\n", dev->db_stride, queues[0].sq_tail, queues[0].cq_head);
	bench_report(&b, dev->hash);
	return 0;
}
