/* ide.c - the primary master of the PIIX3 IDE function: IDENTIFY, one-sector READ/WRITE
 * SECTORS (PIO), READ/WRITE DMA through the bus-master engine (BAR4, one PRD entry), FLUSH CACHE.
 * One request at a time; completion is IRQ 14 (or, in polling mode, the status registers). */
#include "dw.h"

/* ATA task file, legacy primary channel */
#define ATA_DATA 0x1F0
#define ATA_ERROR 0x1F1
#define ATA_NSECT 0x1F2
#define ATA_LBAL 0x1F3
#define ATA_LBAM 0x1F4
#define ATA_LBAH 0x1F5
#define ATA_DEVICE 0x1F6
#define ATA_STATUS 0x1F7 /* read: status (acknowledges INTRQ); write: command */
#define ATA_CTL 0x3F6    /* read: alternate status; write: device control */
#define ATA_SR_ERR 0x01
#define ATA_SR_DRQ 0x08
#define ATA_SR_DF 0x20
#define ATA_SR_BSY 0x80
#define ATA_CTL_NIEN 0x02
#define ATA_CMD_READ_SECTORS 0x20
#define ATA_CMD_WRITE_SECTORS 0x30
#define ATA_CMD_READ_DMA 0xC8
#define ATA_CMD_WRITE_DMA 0xCA
#define ATA_CMD_FLUSH_CACHE 0xE7
#define ATA_CMD_IDENTIFY 0xEC
/* bus-master IDE registers (offsets from BAR4) */
#define BM_CMD 0
#define BM_STATUS 2
#define BM_PRDT 4
#define BM_CMD_START 0x01
#define BM_CMD_READ 0x08 /* the engine writes memory (an ATA read) */
#define BM_ST_ERR 0x02
#define BM_ST_INT 0x04
#define PRD_EOT 0x80000000u

static u16 bm;                 /* bus-master base port (0: no DMA) */
static u32 sectors;
static u32 prd[2] __attribute__((aligned(8)));
static u16 ident[256];
static struct {
    int kind, xfer, failed;
    u8 *buf;
} req;
static volatile int irq_seen;
static volatile u8 irq_status, irq_bm_status;

static int wait_not_busy(u32 ms) {
    u32 t0 = ticks_ms;
    while (inb(ATA_CTL) & ATA_SR_BSY)
        if (ticks_ms - t0 > ms) return -1;
    return 0;
}

static int wait_drq(u32 ms) {
    u32 t0 = ticks_ms;
    for (;;) {
        u8 st = inb(ATA_CTL);
        if (!(st & ATA_SR_BSY) && (st & (ATA_SR_DRQ | ATA_SR_ERR))) return (st & ATA_SR_ERR) ? -1 : 0;
        if (ticks_ms - t0 > ms) return -1;
    }
}

int ide_init(u32 bdf) {
    u32 bar4 = pci_read32(bdf, 0x20);
    pci_write16(bdf, 0x04, pci_read16(bdf, 0x04) | 0x05); /* I/O decode + bus master */
    bm = (bar4 & 1) ? (u16)(bar4 & 0xFFFC) : 0;
    if (inb(ATA_STATUS) == 0xFF) return -1; /* floating bus: no drive */
    outb(ATA_CTL, ATA_CTL_NIEN);
    outb(ATA_DEVICE, 0xA0);
    if (wait_not_busy(2000)) return -2;
    outb(ATA_STATUS, ATA_CMD_IDENTIFY);
    if (wait_drq(2000)) return -3;
    for (int i = 0; i < 256; i++) ident[i] = inw(ATA_DATA);
    sectors = ident[60] | ((u32)ident[61] << 16);
    if (!(ident[49] & (1 << 8))) bm = 0; /* no DMA capability */
    inb(ATA_STATUS);
    outb(ATA_CTL, 0); /* interrupts on */
    return sectors ? 0 : -4;
}

u32 ide_sectors(void) { return sectors; }
u32 ide_bm_base(void) { return bm; }

void ide_irq(void) {
    irq_bm_status = bm ? inb(bm + BM_STATUS) : 0;
    irq_status = inb(ATA_STATUS); /* acknowledges INTRQ */
    irq_seen = 1;
}

void ide_start(int kind, u32 lba, void *buf, int xfer) {
    req.kind = kind;
    req.xfer = (kind == REQ_FLUSH || !bm) ? XFER_PIO : xfer;
    req.buf = buf;
    req.failed = 0;
    if (wait_not_busy(1000)) { req.failed = 1; return; }
    outb(ATA_DEVICE, 0xE0 | ((lba >> 24) & 0x0F)); /* LBA mode, master */
    outb(ATA_NSECT, kind == REQ_FLUSH ? 1 : (u8)io_sectors); /* 256 would be 0; bench caps DMA at 128 */
    outb(ATA_LBAL, lba & 0xFF);
    outb(ATA_LBAM, (lba >> 8) & 0xFF);
    outb(ATA_LBAH, (lba >> 16) & 0xFF);
    irq_seen = 0;
    barrier();
    if (kind == REQ_FLUSH) {
        outb(ATA_STATUS, ATA_CMD_FLUSH_CACHE);
    } else if (req.xfer == XFER_DMA) {
        u8 dir = kind == REQ_READ ? BM_CMD_READ : 0;
        prd[0] = (u32)buf;
        prd[1] = ((io_sectors * SECTOR) & 0xFFFF) | PRD_EOT; /* byte count 0 = 64 KiB */
        outb(bm + BM_CMD, 0);
        outl(bm + BM_PRDT, (u32)prd);
        outb(bm + BM_STATUS, inb(bm + BM_STATUS) | BM_ST_ERR | BM_ST_INT); /* write 1 to clear */
        outb(bm + BM_CMD, dir);
        outb(ATA_STATUS, kind == REQ_READ ? ATA_CMD_READ_DMA : ATA_CMD_WRITE_DMA);
        outb(bm + BM_CMD, dir | BM_CMD_START);
    } else if (kind == REQ_READ) {
        outb(ATA_STATUS, ATA_CMD_READ_SECTORS);
    } else {
        outb(ATA_STATUS, ATA_CMD_WRITE_SECTORS);
        if (wait_drq(1000)) { req.failed = 1; return; }
        const u16 *w = (const u16 *)buf;
        for (int i = 0; i < SECTOR / 2; i++) outw(ATA_DATA, w[i]);
    }
}

int ide_irq_seen(void) { return irq_seen; }

int ide_poll(int use_irq, u32 *status) {
    u8 st, bms = 0;
    *status = 0;
    if (req.failed) { *status = inb(ATA_CTL) | ((u32)inb(ATA_ERROR) << 8); return REQ_ERR; }
    if (use_irq) {
        if (!irq_seen) return REQ_BUSY;
        st = irq_status;
    } else {
        st = inb(ATA_CTL);
        if (st & ATA_SR_BSY) return REQ_BUSY;
        if (req.xfer == XFER_DMA && req.kind != REQ_FLUSH && !(inb(bm + BM_STATUS) & BM_ST_INT)) return REQ_BUSY;
        if (req.kind == REQ_READ && req.xfer == XFER_PIO && !(st & (ATA_SR_DRQ | ATA_SR_ERR))) return REQ_BUSY;
        st = inb(ATA_STATUS);
    }
    if (req.xfer == XFER_DMA) {
        outb(bm + BM_CMD, 0);
        bms = inb(bm + BM_STATUS);
        outb(bm + BM_STATUS, bms | BM_ST_ERR | BM_ST_INT);
    }
    *status = st | ((u32)bms << 16);
    if ((st & (ATA_SR_ERR | ATA_SR_DF)) || (bms & BM_ST_ERR)) {
        *status |= (u32)inb(ATA_ERROR) << 8;
        return REQ_ERR;
    }
    if (req.kind == REQ_READ && req.xfer == XFER_PIO) {
        if (!(st & ATA_SR_DRQ)) return REQ_ERR;
        u16 *w = (u16 *)req.buf;
        for (int i = 0; i < SECTOR / 2; i++) w[i] = inw(ATA_DATA);
    }
    return REQ_OK;
}

/* The transfer method the current request really uses (DMA falls back to PIO without BAR4). */
int ide_xfer(void) { return req.xfer; }
