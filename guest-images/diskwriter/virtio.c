/* virtio.c - virtio-blk with one split virtqueue and one request in flight (header, data and
 * status descriptors 0..2), through either transport of virtio-pci:
 * - legacy: the I/O BAR of a transitional device (1AF4:1001), virtio 0.9.5 register layout;
 * - modern: the vendor capabilities (common, notify, ISR, device config) in memory BARs, as
 *   the only transport of 1AF4:1042 or by choice (parameter flag bit 2) on a transitional one. */
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
#define VIRTIO_CONFIG_S_FEATURES_OK 8
#define VIRTIO_F_VERSION_1 32
/* modern: PCI vendor capability (virtio 1.x 4.1.4) and common configuration layout */
#define PCI_CAP_ID_VNDR 0x09
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define COMMON_DFSELECT 0x00
#define COMMON_DF 0x04
#define COMMON_GFSELECT 0x08
#define COMMON_GF 0x0C
#define COMMON_STATUS 0x14
#define COMMON_Q_SELECT 0x16
#define COMMON_Q_SIZE 0x18
#define COMMON_Q_ENABLE 0x1C
#define COMMON_Q_NOFF 0x1E
#define COMMON_Q_DESCLO 0x20
#define COMMON_Q_DESCHI 0x24
#define COMMON_Q_AVAILLO 0x28
#define COMMON_Q_AVAILHI 0x2C
#define COMMON_Q_USEDLO 0x30
#define COMMON_Q_USEDHI 0x34
#define VRING_ALIGN 4096
#define MAX_QUEUE 1024

struct vring_desc { u64 addr; u32 len; u16 flags, next; };
struct blk_hdr { u32 type, reserved; u64 sector; };

static u16 io;
static u32 sectors, irq_line, queue_size, features;
static int modern;
static volatile u8 *common, *notify, *isr, *devcfg; /* modern: mapped structures */

static inline void mw8(volatile u8 *b, u32 off, u8 v) { *(volatile u8 *)(b + off) = v; }
static inline void mw16(volatile u8 *b, u32 off, u16 v) { *(volatile u16 *)(b + off) = v; }
static inline void mw32(volatile u8 *b, u32 off, u32 v) { *(volatile u32 *)(b + off) = v; }
static inline u8 mr8(volatile u8 *b, u32 off) { return *(volatile u8 *)(b + off); }
static inline u16 mr16(volatile u8 *b, u32 off) { return *(volatile u16 *)(b + off); }
static inline u32 mr32(volatile u8 *b, u32 off) { return *(volatile u32 *)(b + off); }

/* The address of a structure a vendor capability points at; 0 if its BAR is unusable. */
static volatile u8 *cap_addr(u32 bdf, u32 cap) {
    u32 bar = pci_read8(bdf, cap + 4), off = pci_read32(bdf, cap + 8);
    if (bar > 5) return 0;
    u32 lo = pci_read32(bdf, 0x10 + 4 * bar);
    if (lo & 1) return 0; /* an I/O BAR: not used for these */
    if ((lo & 6) == 4 && pci_read32(bdf, 0x14 + 4 * bar)) return 0; /* above 4 GiB: out of reach */
    if (!(lo & ~0xFu)) return 0;
    return (volatile u8 *)((lo & ~0xFu) + off);
}

/* Modern set-up (virtio 1.x 3.1.1); 0 ok. */
static int modern_init(u32 bdf) {
    u32 notify_mult = 0;
    if (!(pci_read16(bdf, 0x06) & 0x10)) return -10; /* no capability list */
    for (u32 cap = pci_read8(bdf, 0x34) & 0xFC, n = 0; cap && n < 48; cap = pci_read8(bdf, cap + 1) & 0xFC, n++) {
        if (pci_read8(bdf, cap) != PCI_CAP_ID_VNDR) continue;
        u8 type = pci_read8(bdf, cap + 3);
        volatile u8 *at = cap_addr(bdf, cap);
        if (type == VIRTIO_PCI_CAP_COMMON_CFG && !common) common = at;
        else if (type == VIRTIO_PCI_CAP_NOTIFY_CFG && !notify) { notify = at; notify_mult = pci_read32(bdf, cap + 16); }
        else if (type == VIRTIO_PCI_CAP_ISR_CFG && !isr) isr = at;
        else if (type == VIRTIO_PCI_CAP_DEVICE_CFG && !devcfg) devcfg = at;
    }
    if (!common || !notify || !isr || !devcfg) return -11;
    pci_write16(bdf, 0x04, pci_read16(bdf, 0x04) | 0x06); /* memory decode + bus master */
    mw8(common, COMMON_STATUS, 0);
    for (u32 t0 = ticks_ms; mr8(common, COMMON_STATUS);)
        if (ticks_ms - t0 > 1000) return -12;
    mw8(common, COMMON_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    mw8(common, COMMON_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    mw32(common, COMMON_DFSELECT, 0);
    u32 lo = mr32(common, COMMON_DF);
    mw32(common, COMMON_DFSELECT, 1);
    u32 hi = mr32(common, COMMON_DF);
    if (!(hi & (1u << (VIRTIO_F_VERSION_1 - 32)))) return -13;
    features = lo & (1u << VIRTIO_BLK_F_FLUSH);
    mw32(common, COMMON_GFSELECT, 0);
    mw32(common, COMMON_GF, features);
    mw32(common, COMMON_GFSELECT, 1);
    mw32(common, COMMON_GF, 1u << (VIRTIO_F_VERSION_1 - 32));
    mw8(common, COMMON_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
    if (!(mr8(common, COMMON_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK)) return -14;
    mw16(common, COMMON_Q_SELECT, 0);
    queue_size = mr16(common, COMMON_Q_SIZE);
    if (queue_size > MAX_QUEUE) { queue_size = MAX_QUEUE; mw16(common, COMMON_Q_SIZE, MAX_QUEUE); }
    if (queue_size < 3) return -2;
    notify += mr16(common, COMMON_Q_NOFF) * notify_mult;
    return 0;
}
static u8 ring[(16 + 2) * MAX_QUEUE + 2 * VRING_ALIGN + 8 * MAX_QUEUE] __attribute__((aligned(VRING_ALIGN)));
static struct vring_desc *desc;
static volatile u16 *avail; /* flags, idx, ring[] */
static volatile u16 *used;  /* flags, idx, then {u32 id, u32 len}[] */
static u16 last_used;
static struct blk_hdr hdr;
static volatile u8 status_byte;
static volatile int irq_seen;

static void ring_layout(void) {
    memset(ring, 0, sizeof ring);
    desc = (struct vring_desc *)ring;
    avail = (volatile u16 *)(ring + 16 * queue_size);
    u32 used_off = (16 * queue_size + 6 + 2 * queue_size + VRING_ALIGN - 1) & ~(VRING_ALIGN - 1);
    used = (volatile u16 *)(ring + used_off);
    last_used = 0;
}

int vd_init(u32 bdf, int want_modern) {
    u32 bar0 = pci_read32(bdf, 0x10);
    irq_line = pci_read8(bdf, 0x3C);
    if (want_modern || !(bar0 & 1)) { /* 1AF4:1042 has no legacy I/O BAR */
        modern = 1;
        int r = modern_init(bdf);
        if (r) return r;
        ring_layout();
        mw32(common, COMMON_Q_DESCLO, (u32)desc);
        mw32(common, COMMON_Q_DESCHI, 0);
        mw32(common, COMMON_Q_AVAILLO, (u32)avail);
        mw32(common, COMMON_Q_AVAILHI, 0);
        mw32(common, COMMON_Q_USEDLO, (u32)used);
        mw32(common, COMMON_Q_USEDHI, 0);
        mw16(common, COMMON_Q_ENABLE, 1);
        mw8(common, COMMON_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
                                       VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        if (mr8(common, COMMON_STATUS) & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED)) return -3;
        u32 lo = mr32(devcfg, 0), hi = mr32(devcfg, 4);
        sectors = hi ? 0xFFFFFFFFu : lo;
        return sectors ? 0 : -4;
    }
    io = bar0 & 0xFFFC;
    pci_write16(bdf, 0x04, pci_read16(bdf, 0x04) | 0x05);
    outb(io + VIRTIO_PCI_STATUS, 0); /* reset */
    outb(io + VIRTIO_PCI_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    outb(io + VIRTIO_PCI_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    features = inl(io + VIRTIO_PCI_HOST_FEATURES) & (1u << VIRTIO_BLK_F_FLUSH);
    outl(io + VIRTIO_PCI_GUEST_FEATURES, features);
    outw(io + VIRTIO_PCI_QUEUE_SEL, 0);
    queue_size = inw(io + VIRTIO_PCI_QUEUE_NUM);
    if (queue_size < 3 || queue_size > MAX_QUEUE) return -2;
    ring_layout();
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
int vd_modern(void) { return modern; }

void vd_irq(void) {
    u8 v = modern ? mr8(isr, 0) : inb(io + VIRTIO_PCI_ISR); /* reading ISR lowers the INTx line */
    if (v & 1) irq_seen = 1;
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
    desc[1].len = io_sectors * SECTOR;
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
    if (modern) mw16(notify, 0, 0);
    else outw(io + VIRTIO_PCI_QUEUE_NOTIFY, 0);
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
