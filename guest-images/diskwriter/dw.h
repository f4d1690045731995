/* dw.h - shared declarations of the diskwriter guest (freestanding, 32-bit flat, no paging).
 * Physical address == linear address == pointer value, so buffers are handed to devices as-is. */
#ifndef DW_H
#define DW_H

#include <stdint.h>
#include <stddef.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }

#define COM1 0x3F8
#define DEBUG_EXIT_PORT 0x501

/* Disk ids as stored in records and printed on serial (FORMAT.md). */
enum { DISK_IDE = 0, DISK_VD = 1, NDISKS = 2 };
/* Transfer methods (record field xfer). */
enum { XFER_PIO = 0, XFER_DMA = 1, XFER_VQ = 2 };
/* Request kinds. */
enum { REQ_WRITE, REQ_READ, REQ_FLUSH };
/* poll results */
enum { REQ_BUSY = 0, REQ_OK = 1, REQ_ERR = 2 };

#define SECTOR 512

/* Sectors per IDE/virtio read or write request: 1 except inside the bench command (main.c). */
extern u32 io_sectors;

/* main.c: console and time */
extern volatile u32 ticks_ms;
void putc_(char c);
void puts_(const char *s);
void putu(u32 v);
void putx(u32 v, int digits);
void fatal(const char *what, u32 value);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* pci (main.c) */
u32 pci_read32(u32 bdf, u32 off);
void pci_write32(u32 bdf, u32 off, u32 v);
u16 pci_read16(u32 bdf, u32 off);
void pci_write16(u32 bdf, u32 off, u16 v);
u8 pci_read8(u32 bdf, u32 off);
void put_bdf(u32 bdf);

/* ide.c: PIIX3 IDE primary master */
int ide_init(u32 bdf);                       /* 0 ok */
u32 ide_sectors(void);
void ide_start(int kind, u32 lba, void *buf, int xfer);
int ide_poll(int use_irq, u32 *status);      /* REQ_BUSY/OK/ERR; status: device status word */
void ide_irq(void);

/* virtio.c: virtio-blk over the legacy I/O transport */
int vd_init(u32 bdf, int want_modern);
u32 vd_sectors(void);
int vd_can_flush(void);
void vd_start(int kind, u32 lba, void *buf);
int vd_poll(u32 *status);
void vd_irq(void);
u32 vd_irq_line(void);
#endif
