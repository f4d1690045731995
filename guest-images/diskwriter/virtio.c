/* virtio.c - virtio-blk through the legacy (transitional, 1AF4:1001) I/O BAR transport with one
 * split virtqueue; one request in flight: header, data and status descriptors 0..2. */
#include "dw.h"

/* legacy virtio-pci registers (offsets from BAR0, no MSI-X) */
#define VIRTIO_PCI_HOST_FEATURES 0x00
#define VIRTIO_PCI_GUEST_FEATURES 0x04
#define VIRTIO_PCI_QUEUE_PFN 0x08
#define VIRTIO_PCI_QUEUE_NUM 0x0C
#define VIRTIO_PCI_QUEUE_SEL 0x0E
#define VIRTIO_PCI_QUEUE_NOTIFY 0x10
#define VIRTIO_PCI_STATUS 0x12
#define VIRTIO_PCI_ISR 0x13
#define VIRTIO_PCI_CONFIG 0x14 /* virtio-blk config: capacity (le64) first */
#define VIRTIO_CONFIG_S_ACKNOWLEDGE 1
#define VIRTIO_CONFIG_S_DRIVER 2
#define VIRTIO_CONFIG_S_DRIVER_OK 4
#define VIRTIO_CONFIG_S_NEEDS_RESET 0x40
#define VIRTIO_CONFIG_S_FAILED 0x80
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_ALIGN 4096
#define MAX_QUEUE 1024

struct vring_desc { u64 addr; u32 len; u16 flags, next; };
struct blk_hdr { u32 type, reserved; u64 sector; };

static u16 io;
static u32 sectors, irq_line, queue_size, features;
static u8 ring[(16 + 2) * MAX_QUEUE + 2 * VRING_ALIGN + 8 * MAX_QUEUE] __attribute__((aligned(VRING_ALIGN)));
static struct vring_desc *desc;
static volatile u16 *avail; /* flags, idx, ring[] */
static volatile u16 *used;  /* flags, idx, then {u32 id, u32 len}[] */
static u16 last_used;
static struct blk_hdr hdr;
static volatile u8 status_byte;
static volatile int irq_seen;

int vd_init(u32 bdf) {
    u32 bar0 = pci_read32(bdf, 0x10);
    if (!(bar0 & 1)) return -1; /* no legacy I/O BAR: a modern-only device */
    io = bar0 & 0xFFFC;
    pci_write16(bdf, 0x04, pci_read16(bdf, 0x04) | 0x05);
    irq_line = pci_read8(bdf, 0x3C);
    outb(io + VIRTIO_PCI_STATUS, 0); /* reset */
    outb(io + VIRTIO_PCI_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    outb(io + VIRTIO_PCI_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    features = inl(io + VIRTIO_PCI_HOST_FEATURES) & (1u << VIRTIO_BLK_F_FLUSH);
    outl(io + VIRTIO_PCI_GUEST_FEATURES, features);
    outw(io + VIRTIO_PCI_QUEUE_SEL, 0);
    queue_size = inw(io + VIRTIO_PCI_QUEUE_NUM);
    if (queue_size < 3 || queue_size > MAX_QUEUE) return -2;
    memset(ring, 0, sizeof ring);
    desc = (struct vring_desc *)ring;
    avail = (volatile u16 *)(ring + 16 * queue_size);
    u32 used_off = (16 * queue_size + 6 + 2 * queue_size + VRING_ALIGN - 1) & ~(VRING_ALIGN - 1);
    used = (volatile u16 *)(ring + used_off);
    last_used = 0;
    outl(io + VIRTIO_PCI_QUEUE_PFN, (u32)ring / VRING_ALIGN);
    outb(io + VIRTIO_PCI_STATUS,
         VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK);
    if (inb(io + VIRTIO_PCI_STATUS) & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED)) return -3;
    u32 lo = inl(io + VIRTIO_PCI_CONFIG), hi = inl(io + VIRTIO_PCI_CONFIG + 4);
    sectors = hi ? 0xFFFFFFFFu : lo;
    return sectors ? 0 : -4;
}

u32 vd_sectors(void) { return sectors; }
u32 vd_irq_line(void) { return irq_line; }
u32 vd_io_base(void) { return io; }
u32 vd_queue_size(void) { return queue_size; }
int vd_can_flush(void) { return (features >> VIRTIO_BLK_F_FLUSH) & 1; }
int vd_irq_seen(void) { return irq_seen; }

void vd_irq(void) {
    if (inb(io + VIRTIO_PCI_ISR) & 1) irq_seen = 1; /* reading ISR lowers the INTx line */
}

void vd_start(int kind, u32 lba, void *buf) {
    hdr.type = kind == REQ_WRITE ? VIRTIO_BLK_T_OUT : kind == REQ_READ ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_FLUSH;
    hdr.reserved = 0;
    hdr.sector = kind == REQ_FLUSH ? 0 : lba;
    status_byte = 0xFF;
    desc[0].addr = (u32)&hdr;
    desc[0].len = sizeof hdr;
    desc[0].flags = VRING_DESC_F_NEXT;
    desc[0].next = kind == REQ_FLUSH ? 2 : 1;
    desc[1].addr = (u32)buf;
    desc[1].len = SECTOR;
    desc[1].flags = VRING_DESC_F_NEXT | (kind == REQ_READ ? VRING_DESC_F_WRITE : 0);
    desc[1].next = 2;
    desc[2].addr = (u32)&status_byte;
    desc[2].len = 1;
    desc[2].flags = VRING_DESC_F_WRITE;
    desc[2].next = 0;
    irq_seen = 0;
    u16 idx = avail[1];
    avail[2 + idx % queue_size] = 0;
    barrier();
    avail[1] = idx + 1; /* publish after the descriptors and ring entry */
    barrier();
    outw(io + VIRTIO_PCI_QUEUE_NOTIFY, 0);
}

int vd_poll(u32 *status) {
    *status = 0;
    barrier();
    if (used[1] == last_used) return REQ_BUSY;
    last_used++;
    barrier();
    *status = status_byte;
    return status_byte == 0 ? REQ_OK : REQ_ERR;
}
