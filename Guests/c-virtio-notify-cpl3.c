/* c-virtio-notify-cpl3 - a virtio-mmio-shaped driver for minivmm's doorbell
 * device: a split virtqueue (descriptor table, avail ring, used side) in
 * RAM, buffers added then the queue kicked through the transport's
 * bool (*notify)(struct virtqueue *) callback, which writes the
 * notification data (queue index | next avail index << 16, as with
 * VIRTIO_F_NOTIFICATION_DATA) to QUEUE_NOTIFY (the doorbell, 0x40). The avail
 * ring is published with virtio_wmb(weak_barriers) before the kick; the
 * console-style sender spins on virtqueue_get_buf until the device has used
 * the buffer (the doorbell's completion queue stands in for the used ring).
 * Command line: iters=N (default 4096) warmup=W.
 * RESULT checksum: FNV-1a 32 over the used entries' result words. */
#include "c/lib.h"
#include "c/io.h"
#include "c/serial.h"

#define __iomem volatile

#define VIRTIO_MMIO_MAGIC_VALUE 0x000 /* the doorbell's ID */
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x004 /* the doorbell's STATUS */
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x008
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x00c
#define VIRTIO_MMIO_QUEUE_NUM 0x010
#define VIRTIO_MMIO_QUEUE_READY 0x014
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x040
#define DBEL_MAGIC 0x4c454244

#define VQ_NUM 256

static inline u32 readl(const __iomem void *addr)
{
	u32 v;

	asm volatile("movl %1, %0" : "=r"(v) : "m"(*(const __iomem u32 *)addr));
	return v;
}

static inline void writel(u32 v, __iomem void *addr)
{
	asm volatile("movl %0, %1" : : "r"(v), "m"(*(__iomem u32 *)addr));
}

#define virt_wmb() barrier()
#define wmb() asm volatile("sfence" ::: "memory")
#define virt_rmb() barrier()

static inline void virtio_wmb(bool weak_barriers)
{
	if (weak_barriers)
		virt_wmb();
	else
		wmb();
}

#define READ_ONCE(x) (*(const volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[VQ_NUM];
};

struct vring_used_elem { /* the doorbell's completion entry */
	u32 id; /* result */
	u32 len; /* sequence */
};

struct virtqueue;
typedef bool (*vq_notify_fn)(struct virtqueue *);

struct virtqueue {
	const char *name;
	unsigned int index;
	unsigned int num_free;
	void *priv;
	bool (*notify)(struct virtqueue *vq);
	bool broken;
	bool weak_barriers;
	u16 free_head;
	u16 avail_idx_shadow;
	u16 num_added;
	u16 last_used_idx;
	struct vring_desc *desc;
	struct vring_avail *avail;
	volatile struct vring_used_elem *used;
	void *data[VQ_NUM];
};

struct virtio_mmio_device {
	void __iomem *base;
	unsigned long version;
	struct virtqueue *vqs[1];
};

static struct vring_desc desc_table[VQ_NUM] __attribute__((aligned(16)));
static struct vring_avail avail_ring __attribute__((aligned(2)));
static struct vring_used_elem used_ring[VQ_NUM] __attribute__((aligned(4096)));
static struct virtqueue out_vq;
static struct virtio_mmio_device vm_dev_storage;
static u32 payload[VQ_NUM];

static struct uart_port com1;
static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

static inline u32 vring_notification_data(struct virtqueue *vq)
{
	return vq->index | ((u32)vq->avail_idx_shadow << 16);
}

/* The transport's notify (virtio_mmio.c: vm_notify_with_data). */
static bool vm_notify_with_data(struct virtqueue *vq)
{
	struct virtio_mmio_device *vm_dev = vq->priv;
	u32 data = vring_notification_data(vq);

	writel(data, (u8 __iomem *)vm_dev->base + VIRTIO_MMIO_QUEUE_NOTIFY);
	return true;
}

/* The plain one (vm_notify), used by the setup's probe kick. */
static bool vm_notify(struct virtqueue *vq)
{
	struct virtio_mmio_device *vm_dev = vq->priv;

	writel(vq->index, (u8 __iomem *)vm_dev->base + VIRTIO_MMIO_QUEUE_NOTIFY);
	return true;
}

static int virtqueue_add_outbuf(struct virtqueue *vq, void *buf, u32 len, void *data)
{
	u16 head, avail;

	if (vq->broken)
		return -5;
	if (!vq->num_free)
		return -28;
	head = vq->free_head;
	vq->desc[head].addr = (u64)(unsigned long)buf;
	vq->desc[head].len = len;
	vq->desc[head].flags = 0;
	vq->free_head = vq->desc[head].next;
	vq->num_free--;
	vq->data[head] = data;

	avail = vq->avail_idx_shadow & (VQ_NUM - 1);
	vq->avail->ring[avail] = head;
	/* Descriptors and ring entry visible before the index. */
	virtio_wmb(vq->weak_barriers);
	vq->avail_idx_shadow++;
	WRITE_ONCE(vq->avail->idx, vq->avail_idx_shadow);
	vq->num_added++;
	return 0;
}

static bool virtqueue_kick_prepare(struct virtqueue *vq)
{
	/* The index update before the notification (virtio_mb, weak: barrier). */
	virtio_wmb(vq->weak_barriers);
	vq->num_added = 0;
	return !(READ_ONCE(vq->avail->flags) & 1); /* VRING_AVAIL_F_NO_INTERRUPT stands in for NO_NOTIFY */
}

static bool virtqueue_notify(struct virtqueue *vq)
{
	if (unlikely(vq->broken))
		return false;
	if (!vq->notify(vq)) {
		vq->broken = true;
		return false;
	}
	return true;
}

static bool virtqueue_kick(struct virtqueue *vq)
{
	if (virtqueue_kick_prepare(vq))
		return virtqueue_notify(vq);
	return true;
}

static void *virtqueue_get_buf(struct virtqueue *vq, u32 *result)
{
	volatile struct vring_used_elem *e = &vq->used[vq->last_used_idx & (VQ_NUM - 1)];
	u16 head;
	void *ret;

	if ((u16)e->len != (u16)(vq->last_used_idx + 1))
		return NULL;
	virt_rmb();
	*result = e->id;
	/* VIRTIO_F_IN_ORDER: the device uses buffers in the order they were made available. */
	head = vq->avail->ring[vq->last_used_idx & (VQ_NUM - 1)];
	ret = vq->data[head];
	vq->data[head] = NULL;
	vq->desc[head].next = vq->free_head;
	vq->free_head = head;
	vq->num_free++;
	vq->last_used_idx++;
	return ret;
}

static u32 hash;
static unsigned long spins, sent;

/* hvc/virtio_console's __send_to_port: add, kick, spin until used. */
static int send_to_port(struct virtqueue *vq, u32 *buf)
{
	u32 result;
	int err;

	err = virtqueue_add_outbuf(vq, buf, sizeof(*buf), buf);
	if (err)
		return err;
	if (!virtqueue_kick(vq))
		return -5;
	while (!virtqueue_get_buf(vq, &result) && !vq->broken) {
		if (++spins > 100000000)
			return -110;
		cpu_relax();
	}
	hash = fnv1a(hash, &result, sizeof(result));
	sent++;
	return 0;
}

static int run(struct virtqueue *vq, unsigned long from, unsigned long to)
{
	for (unsigned long j = from; j < to; j++) {
		u32 *buf = &payload[j & (VQ_NUM - 1)];

		*buf = (u32)j * 2654435761u;
		if (send_to_port(vq, buf))
			return -1;
	}
	return 0;
}

static int vm_setup_vq(struct virtio_mmio_device *vm_dev, struct virtqueue *vq, bool notify_data)
{
	u8 __iomem *base = vm_dev->base;
	unsigned long used = (unsigned long)used_ring;

	memset(vq, 0, sizeof(*vq));
	vq->name = "output";
	vq->index = 0;
	vq->priv = vm_dev;
	vq->notify = notify_data ? vm_notify_with_data : vm_notify;
	vq->weak_barriers = true;
	vq->desc = desc_table;
	vq->avail = &avail_ring;
	vq->used = used_ring;
	vq->num_free = VQ_NUM;
	for (int i = 0; i < VQ_NUM - 1; i++)
		desc_table[i].next = (u16)(i + 1);
	memset(used_ring, 0, sizeof(used_ring));
	writel((u32)used, base + VIRTIO_MMIO_QUEUE_USED_LOW);
	writel((u32)(used >> 32), base + VIRTIO_MMIO_QUEUE_USED_HIGH);
	writel(VQ_NUM, base + VIRTIO_MMIO_QUEUE_NUM);
	writel(1, base + VIRTIO_MMIO_QUEUE_READY);
	vm_dev->vqs[0] = vq;
	return 0;
}

int main(const char *cmdline)
{
	struct virtio_mmio_device *vm_dev = &vm_dev_storage;
	struct bench b;
	u32 magic, intr;

	serial8250_init_port(&com1, 0x3f8, 115200, UPIO_PORT);
	register_console(&serial_console);
	vm_dev->base = (void __iomem *)0xd0000000UL;
	magic = readl((u8 __iomem *)vm_dev->base + VIRTIO_MMIO_MAGIC_VALUE);
	if (magic != DBEL_MAGIC) {
		printk("virtio-mmio: wrong magic value 0x%08x!\n", magic);
		return 2;
	}
	vm_setup_vq(vm_dev, &out_vq, cmdline_ulong(cmdline, "notifydata", 1) != 0);
	hash = FNV_OFFSET;
	bench_init(&b, "c-virtio-notify-cpl3", cmdline, 4096);
	if (run(&out_vq, 0, b.warmup))
		return 3;
	bench_mark_start(&b);
	if (run(&out_vq, b.warmup, b.iters))
		return 3;
	bench_mark_end(&b);
	intr = readl((u8 __iomem *)vm_dev->base + VIRTIO_MMIO_INTERRUPT_STATUS);
	printk("virtio-mmio: %lu sent, device count %u, free %u\n", sent, intr, out_vq.num_free);
	bench_report(&b, hash);
	return intr == sent ? 0 : 3;
}
