/* main.c - the diskwriter guest: finds the disks by PCI scan, writes self-describing records to
 * a region of each (FORMAT.md "Record"), reports every issue/completion on COM1 and takes
 * commands there (FORMAT.md "Serial protocol").  Single-threaded: interrupt handlers only note
 * what happened; the main loop turns it into serial lines, so their order is the true order. */
#include "dw.h"

#define VERSION 1
#define IMAGE_SECTORS 128 /* the bootable image (64 KiB) the data area must not overlap */
#define MAX_REGION 4096
#define MAX_RATE 1000000 /* writes/s: keeps the token arithmetic inside 32 bits */
#define UNKNOWN_SEQ 0xFFFFFFFFu /* a write that failed: its sector's content is undefined */
#define IRQ_GRACE_MS 1000       /* no interrupt this long after a request: switch to polling */
#define REQ_TIMEOUT_MS 10000
#define EXIT_QUIT 0  /* QEMU exit status 1 */
#define EXIT_FATAL 3 /* QEMU exit status 7 */
#define PIT_HZ 1193182
#define TICK_HZ 1000
#define IDE_IRQ 14

/* Record layout (FORMAT.md): little-endian u32 fields after an 8-byte magic. */
#define REC_MAGIC "EMUDWR01"
enum { R_RUN = 2, R_DISK, R_SEQ, R_LBA, R_GEN, R_XFER, R_RSTART, R_RCOUNT, R_TIME, R_PAYLOAD };
#define R_CRC 127
#define PAYLOAD_WORDS (R_CRC - R_PAYLOAD)

struct params {
    char magic[8];
    u32 region_start, region_count, rate, flush_every, ide_mode, flags;
};
#define PF_START_PAUSED 1
#define PF_NO_IRQ 2
#define PF_VIRTIO_MODERN 4

struct disk {
    const char *name;
    int id, present, use_irq;
    u32 sectors, irq;
    /* the request in flight */
    int busy, kind, xfer;
    u32 seq, idx, issued_ms, flush_upto;
    /* writer state */
    u32 next_idx, pass, credit, since_flush, last_done, alt;
    /* counters for the stats line */
    u32 issued, completed, errors, flushes, irqs, by_xfer[3];
    u32 *done_seq; /* per region index: seq of the newest completed write, 0 none */
    u8 *buf;
};

volatile u32 ticks_ms;
static struct params P;
static struct disk disks[NDISKS];
static u32 done_tab[NDISKS][MAX_REGION];
static u8 bufs[NDISKS][SECTOR] __attribute__((aligned(SECTOR)));
static u8 vbuf[SECTOR] __attribute__((aligned(SECTOR)));
static u32 crc_table[256];
static u32 run_id, seq_counter;
static int running, pause_reported, ide_mode;
static u64 idt[48];
extern const u32 isr_table[48];
static volatile u32 irq_counts[16];

extern int ide_irq_seen(void);
extern int ide_xfer(void);
extern u32 ide_bm_base(void);
extern int vd_irq_seen(void);
extern u32 vd_io_base(void);
extern u32 vd_queue_size(void);
extern int vd_modern(void);

/* ---- libc bits gcc may call ---- */
void *memset(void *d, int c, size_t n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, size_t n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}
int memcmp(const void *a, const void *b, size_t n) {
    const u8 *p = a, *q = b;
    for (; n--; p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}

/* ---- COM1 ---- */
void putc_(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {}
    outb(COM1, (u8)c);
}
void puts_(const char *s) {
    while (*s) putc_(*s++);
}
void putu(u32 v) {
    char b[11];
    int i = 10;
    b[i] = 0;
    do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts_(b + i);
}
void putx(u32 v, int digits) {
    for (int i = digits - 1; i >= 0; i--) putc_("0123456789abcdef"[(v >> (4 * i)) & 15]);
}
static void nl(void) { puts_("\r\n"); }
static void kv(const char *k, u32 v) { putc_(' '); puts_(k); putc_('='); putu(v); }

void fatal(const char *what, u32 value) {
    cli();
    puts_("S fatal ");
    puts_(what);
    puts_(" 0x");
    putx(value, 8);
    nl();
    outb(DEBUG_EXIT_PORT, EXIT_FATAL);
    for (;;) __asm__ volatile("hlt");
}

/* ---- PCI configuration mechanism #1 ---- */
u32 pci_read32(u32 bdf, u32 off) { outl(0xCF8, 0x80000000u | bdf << 8 | (off & 0xFC)); return inl(0xCFC); }
void pci_write32(u32 bdf, u32 off, u32 v) { outl(0xCF8, 0x80000000u | bdf << 8 | (off & 0xFC)); outl(0xCFC, v); }
u16 pci_read16(u32 bdf, u32 off) { return (u16)(pci_read32(bdf, off) >> (8 * (off & 2))); }
u8 pci_read8(u32 bdf, u32 off) { return (u8)(pci_read32(bdf, off) >> (8 * (off & 3))); }
void pci_write16(u32 bdf, u32 off, u16 v) {
    outl(0xCF8, 0x80000000u | bdf << 8 | (off & 0xFC));
    outw(0xCFC + (off & 2), v);
}
void put_bdf(u32 bdf) {
    putx(bdf >> 8, 2); putc_(':'); putx((bdf >> 3) & 31, 2); putc_('.'); putx(bdf & 7, 1);
}

/* ---- interrupts: IDT, 8259 pair remapped to 0x20/0x28, PIT at 1 kHz ---- */
static void pic_unmask(u32 irq) {
    if (irq < 8) {
        outb(0x21, inb(0x21) & ~(1 << irq));
    } else {
        outb(0xA1, inb(0xA1) & ~(1 << (irq - 8)));
        outb(0x21, inb(0x21) & ~(1 << 2));
    }
}

static void interrupts_init(void) {
    for (int v = 0; v < 48; v++) {
        u32 h = isr_table[v];
        idt[v] = (h & 0xFFFF) | (0x08u << 16) | ((u64)0x8E00 << 32) | ((u64)(h >> 16) << 48);
    }
    struct __attribute__((packed)) { u16 limit; u32 base; } idtr = { sizeof idt - 1, (u32)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* ICW1..4: edge/level comes from ELCR (kept as the BIOS set it), vectors 0x20/0x28 */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
    u16 div = (PIT_HZ + TICK_HZ / 2) / TICK_HZ;
    outb(0x43, 0x34); /* channel 0, lobyte/hibyte, mode 2 */
    outb(0x40, div & 0xFF);
    outb(0x40, div >> 8);
    pic_unmask(0);
}

void dw_interrupt(u32 vector, u32 error, u32 eip) {
    if (vector < 32) {
        puts_("S fault vector="); putu(vector);
        puts_(" error="); putx(error, 8);
        puts_(" eip="); putx(eip, 8);
        nl();
        outb(DEBUG_EXIT_PORT, EXIT_FATAL);
        for (;;) __asm__ volatile("cli; hlt");
    }
    u32 irq = vector - 0x20;
    if (irq == 7 || irq == 15) { /* spurious unless the ISR says otherwise */
        outb(irq == 7 ? 0x20 : 0xA0, 0x0B);
        if (!(inb(irq == 7 ? 0x20 : 0xA0) & 0x80)) {
            if (irq == 15) outb(0x20, 0x20);
            return;
        }
    }
    irq_counts[irq]++;
    if (irq == 0) ticks_ms++;
    if (irq == IDE_IRQ && disks[DISK_IDE].present) { disks[DISK_IDE].irqs++; ide_irq(); }
    if (disks[DISK_VD].present && irq == disks[DISK_VD].irq) { disks[DISK_VD].irqs++; vd_irq(); }
    if (irq >= 8) outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

/* Wait for an interrupt without losing one that arrives between the check and the HLT. */
static void idle(void) {
    __asm__ volatile("sti; hlt" : : : "memory");
}

/* ---- records ---- */
static void crc_init(void) {
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}
static u32 crc32(const u8 *p, u32 n) {
    u32 c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}
static u32 payload_seed(const u32 *w) {
    return w[R_RUN] * 0x27D4EB2Fu + w[R_SEQ] * 0x9E3779B1u + w[R_LBA] * 0x85EBCA6Bu + w[R_GEN] * 0xC2B2AE35u
           + w[R_DISK];
}
static void record_build(u8 *buf, const struct disk *d, u32 seq, u32 lba, u32 gen, u32 xfer) {
    u32 *w = (u32 *)buf;
    memcpy(buf, REC_MAGIC, 8);
    w[R_RUN] = run_id;
    w[R_DISK] = d->id;
    w[R_SEQ] = seq;
    w[R_LBA] = lba;
    w[R_GEN] = gen;
    w[R_XFER] = xfer;
    w[R_RSTART] = P.region_start;
    w[R_RCOUNT] = P.region_count;
    w[R_TIME] = ticks_ms;
    u32 seed = payload_seed(w);
    for (u32 k = 0; k < PAYLOAD_WORDS; k++) w[R_PAYLOAD + k] = seed ^ (k * 0x01000193u);
    w[R_CRC] = crc32(buf, 4 * R_CRC);
}
/* 0: a valid record; else why not (FORMAT.md names them). */
static const char *record_check(const u8 *buf, const struct disk *d, u32 lba) {
    const u32 *w = (const u32 *)buf;
    if (memcmp(buf, REC_MAGIC, 8)) return "magic";
    if (w[R_CRC] != crc32(buf, 4 * R_CRC)) return "crc";
    u32 seed = payload_seed(w);
    for (u32 k = 0; k < PAYLOAD_WORDS; k++)
        if (w[R_PAYLOAD + k] != (seed ^ (k * 0x01000193u))) return "payload";
    if (w[R_DISK] != (u32)d->id) return "disk";
    if (w[R_LBA] != lba) return "lba";
    return 0;
}

/* ---- requests ---- */
static const char *xfer_name(int x) { return x == XFER_PIO ? "pio" : x == XFER_DMA ? "dma" : "vq"; }

static void start(struct disk *d, int kind, u32 lba, void *buf, int xfer) {
    d->busy = 1;
    d->kind = kind;
    d->issued_ms = ticks_ms;
    if (d->id == DISK_IDE) {
        ide_start(kind, lba, buf, xfer);
        d->xfer = ide_xfer();
    } else {
        vd_start(kind, lba, buf);
        d->xfer = XFER_VQ;
    }
}

/* REQ_BUSY, REQ_OK or REQ_ERR for d's request; switches d to polling (and says so) when its
 * device finished but its interrupt did not come within IRQ_GRACE_MS. */
static int poll_disk(struct disk *d, u32 *status) {
    int r;
    if (d->id == DISK_IDE) {
        r = ide_poll(d->use_irq, status);
        if (r == REQ_BUSY && d->use_irq && ticks_ms - d->issued_ms > IRQ_GRACE_MS) {
            r = ide_poll(0, status);
            if (r != REQ_BUSY) { d->use_irq = 0; puts_("S irq-missing ide polling"); nl(); }
        }
    } else {
        if (d->use_irq && !vd_irq_seen()) {
            if (ticks_ms - d->issued_ms <= IRQ_GRACE_MS) return REQ_BUSY;
            r = vd_poll(status);
            if (r != REQ_BUSY) { d->use_irq = 0; puts_("S irq-missing vd polling"); nl(); }
            return r;
        }
        r = vd_poll(status);
    }
    if (r == REQ_BUSY && ticks_ms - d->issued_ms > REQ_TIMEOUT_MS) {
        *status = 0xFFFFFFFFu;
        return REQ_ERR; /* the device never answered: report it, keep going */
    }
    return r;
}

/* Turn a finished request into its serial line. */
static void service(struct disk *d) {
    u32 st;
    if (!d->busy) return;
    int r = poll_disk(d, &st);
    if (r == REQ_BUSY) return;
    d->busy = 0;
    if (d->kind == REQ_WRITE) {
        if (r == REQ_OK) {
            d->done_seq[d->idx] = d->seq;
            d->last_done = d->seq;
            d->completed++;
            puts_("C "); puts_(d->name); putc_(' '); putu(d->seq);
        } else {
            d->done_seq[d->idx] = UNKNOWN_SEQ;
            d->errors++;
            puts_("E "); puts_(d->name); putc_(' '); putu(d->seq); putc_(' '); putx(st, 8);
        }
        nl();
    } else if (d->kind == REQ_FLUSH) {
        if (r == REQ_OK) {
            d->flushes++;
            puts_("FC "); puts_(d->name); putc_(' '); putu(d->flush_upto);
        } else {
            d->errors++;
            puts_("FE "); puts_(d->name); putc_(' '); putu(d->flush_upto); putc_(' '); putx(st, 8);
        }
        nl();
    }
}

static void issue_flush(struct disk *d) {
    d->flush_upto = d->last_done;
    d->since_flush = 0;
    puts_("F "); puts_(d->name); putc_(' '); putu(d->flush_upto); nl();
    start(d, REQ_FLUSH, 0, 0, XFER_PIO);
}

static int can_flush(const struct disk *d) { return d->id == DISK_IDE || vd_can_flush(); }

static void issue_write(struct disk *d) {
    int xfer = XFER_VQ;
    if (d->id == DISK_IDE) {
        xfer = ide_mode == 1 ? XFER_PIO : ide_mode == 2 ? XFER_DMA : (d->alt++ & 1) ? XFER_DMA : XFER_PIO;
        if (!ide_bm_base()) xfer = XFER_PIO;
    }
    u32 seq = ++seq_counter;
    u32 lba = P.region_start + d->next_idx;
    u32 gen = d->pass + 1;
    record_build(d->buf, d, seq, lba, gen, xfer);
    d->seq = seq;
    d->idx = d->next_idx;
    /* The W line leaves before the device sees the request: a write absent from the log
     * before a cut cannot be in that cut. */
    puts_("W "); puts_(d->name); putc_(' '); putu(seq); putc_(' '); putu(lba); putc_(' ');
    putu(gen); putc_(' '); puts_(xfer_name(xfer)); nl();
    start(d, REQ_WRITE, lba, d->buf, xfer);
    d->issued++;
    d->by_xfer[xfer]++;
    d->since_flush++;
    if (++d->next_idx == P.region_count) { d->next_idx = 0; d->pass++; }
}

static int any_busy(void) { return disks[0].busy || disks[1].busy; }

static void service_all(void) {
    for (int i = 0; i < NDISKS; i++) service(&disks[i]);
}

static void drain(void) {
    while (any_busy()) {
        service_all();
        cli();
        if (any_busy()) idle(); else sti();
    }
}

/* Blocking one-sector read for the verifier (writes were drained first): 1 when it worked. */
static int read_sector(struct disk *d, u32 lba, void *buf, int xfer) {
    start(d, REQ_READ, lba, buf, xfer);
    for (;;) {
        u32 st;
        int r = poll_disk(d, &st);
        if (r != REQ_BUSY) { d->busy = 0; return r == REQ_OK; }
        cli();
        idle();
    }
}

/* ---- commands ---- */
static void say(const char *state) { puts_("S "); puts_(state); nl(); }

static void stats(void) {
    puts_("S stats"); kv("seq", seq_counter); kv("ticks", ticks_ms); nl();
    for (int i = 0; i < NDISKS; i++) {
        struct disk *d = &disks[i];
        if (!d->present) continue;
        puts_("S stats "); puts_(d->name);
        kv("issued", d->issued); kv("completed", d->completed); kv("errors", d->errors);
        kv("flushes", d->flushes); kv("irqs", d->irqs); kv("pio", d->by_xfer[XFER_PIO]);
        kv("dma", d->by_xfer[XFER_DMA]); kv("vq", d->by_xfer[XFER_VQ]);
        kv("polling", !d->use_irq); nl();
    }
}

static void verify(void) {
    int was_running = running, bad_total = 0;
    running = 0;
    drain();
    say("verify");
    for (int i = 0; i < NDISKS; i++) {
        struct disk *d = &disks[i];
        if (!d->present) continue;
        u32 match = 0, empty = 0, other = 0, unknown = 0, mismatch = 0, rerr = 0, shown = 0;
        for (u32 k = 0; k < P.region_count; k++) {
            u32 lba = P.region_start + k, want = d->done_seq[k];
            int xfer = d->id == DISK_VD ? XFER_VQ : (ide_mode == 1 || (ide_mode == 0 && (k & 1))) ? XFER_PIO
                                                                                                    : XFER_DMA;
            if (!read_sector(d, lba, vbuf, xfer)) { rerr++; continue; }
            const u32 *w = (const u32 *)vbuf;
            const char *why = record_check(vbuf, d, lba);
            if (want == UNKNOWN_SEQ) { unknown++; continue; }
            if (!why && w[R_RUN] == run_id && w[R_SEQ] == want && want) { match++; continue; }
            if (!want) {
                int zero = 1;
                for (int j = 0; j < SECTOR / 4; j++) zero &= w[j] == 0;
                if (zero) { empty++; continue; }
                if (why || w[R_RUN] != run_id) { other++; continue; }
            }
            mismatch++;
            if (shown++ < 8) {
                puts_("V bad "); puts_(d->name); putc_(' '); putu(lba); kv("want", want);
                kv("got", why ? 0 : w[R_SEQ]); puts_(" why="); puts_(why ? why : w[R_RUN] != run_id ? "run" : "seq");
                nl();
            }
        }
        puts_("V "); puts_(d->name); kv("checked", P.region_count); kv("match", match); kv("empty", empty);
        kv("other", other); kv("unknown", unknown); kv("mismatch", mismatch); kv("read_errors", rerr); nl();
        bad_total += mismatch + rerr;
    }
    puts_(bad_total ? "V end bad" : "V end ok"); nl();
    running = was_running;
    pause_reported = 0;
    say(running ? "running" : "paused");
    pause_reported = 1;
    for (int i = 0; i < NDISKS; i++) disks[i].credit = 0;
}

static void quit(void) {
    running = 0;
    drain();
    for (int i = 0; i < NDISKS; i++)
        if (disks[i].present && can_flush(&disks[i])) {
            issue_flush(&disks[i]);
            drain();
        }
    stats();
    puts_("S quit"); kv("seq", seq_counter); nl();
    outb(DEBUG_EXIT_PORT, EXIT_QUIT);
    for (;;) __asm__ volatile("cli; hlt"); /* an emulator may run a few instructions more: say nothing */
}

static int strcmp_(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return (u8)*a - (u8)*b;
}

static int parse_u32(const char *s, u32 *out) {
    u32 v = 0;
    if (!*s) return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 100000000u) return 0;
        v = v * 10 + (u32)(*s - '0');
    }
    *out = v;
    return 1;
}

/* ---- bench (FORMAT.md "Bench") ---- */
u32 io_sectors = 1;
#define BENCH_BUF ((u8 *)0x100000)   /* 1 MiB at 1 MiB: only the bench touches memory above 1 MiB */
#define BENCH_MAX_SECTORS 2048      /* 1 MiB */
#define BENCH_MAX_DMA 128           /* one PRD entry (64 KiB) */
#define BENCH_MAX_COUNT 1000000

static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (u64)hi << 32 | lo; }

/* Next whitespace-separated token of *s (NUL-terminated in place), "" at the end. */
static char *token(char **s) {
    char *p = *s, *t;
    while (*p == ' ') p++;
    t = p;
    while (*p && *p != ' ') p++;
    if (*p) *p++ = 0;
    *s = p;
    return t;
}

static void bench_refuse(const char *why) { puts_("S error bench-"); puts_(why); nl(); }

/* bench <disk> <pio|dma|vq> <read|write> <seq|rand> <sectors> <count> [trace]: <count> blocking
 * requests of <sectors> sectors each on the bench area (after the writer's region, so `v` stays
 * valid); one B line with the elapsed time and the longest gap between completions, by the 1 kHz
 * tick and by the TSC (in units of 1024 cycles: the host knows the rate, the guest does not);
 * `trace` prints a `b` line at every completion so the host can time them with its own clock. */
static void bench(char *args) {
    char *a[7];
    u32 sectors, count;
    for (int i = 0; i < 7; i++) a[i] = token(&args);
    int trace = !strcmp_(a[6], "trace");
    if (!*a[5] || (*a[6] && !trace) || *token(&args)) { bench_refuse("args"); return; }
    struct disk *d = !strcmp_(a[0], "ide") ? &disks[DISK_IDE] : !strcmp_(a[0], "vd") ? &disks[DISK_VD] : 0;
    int xfer = !strcmp_(a[1], "pio") ? XFER_PIO : !strcmp_(a[1], "dma") ? XFER_DMA : !strcmp_(a[1], "vq") ? XFER_VQ : -1;
    int kind = !strcmp_(a[2], "read") ? REQ_READ : !strcmp_(a[2], "write") ? REQ_WRITE : -1;
    int rnd = !strcmp_(a[3], "rand") ? 1 : !strcmp_(a[3], "seq") ? 0 : -1;
    if (!d || xfer < 0 || kind < 0 || rnd < 0 || !parse_u32(a[4], &sectors) || !parse_u32(a[5], &count)) {
        bench_refuse("args");
        return;
    }
    if (!d->present) { bench_refuse("nodisk"); return; }
    if ((d->id == DISK_VD) != (xfer == XFER_VQ) || (xfer == XFER_DMA && !ide_bm_base())) { bench_refuse("method"); return; }
    u32 max = xfer == XFER_PIO ? 1 : xfer == XFER_DMA ? BENCH_MAX_DMA : BENCH_MAX_SECTORS;
    if (!sectors || sectors > max || !count || count > BENCH_MAX_COUNT) { bench_refuse("size"); return; }
    u32 area = P.region_start + P.region_count;
    if (d->sectors < area + sectors) { bench_refuse("small"); return; }
    u32 slots = (d->sectors - area) / sectors, rng = run_id | 1, ok = 0, errors = 0, maxgap = 0;
    int was_running = running;
    running = 0;
    drain();
    if (kind == REQ_WRITE)
        for (u32 i = 0; i < sectors * SECTOR / 4; i++) ((u32 *)BENCH_BUF)[i] = run_id ^ i;
    io_sectors = sectors;
    u32 t0 = ticks_ms, last = t0;
    u64 c0 = rdtsc(), clast = c0, cmaxgap = 0;
    u32 tsc_back = 0; /* steps where the TSC went backwards: not a gap, but worth reporting */
    for (u32 i = 0; i < count; i++) {
        rng = rng * 1103515245u + 12345u; /* an LCG is random enough for placement */
        u32 slot = rnd ? (rng >> 8) % slots : i % slots;
        start(d, kind, area + slot * sectors, BENCH_BUF, xfer);
        u32 st;
        int r;
        for (;;) {
            r = poll_disk(d, &st);
            if (r != REQ_BUSY) break;
            cli();
            idle();
        }
        d->busy = 0;
        if (r == REQ_OK) ok++; else errors++;
        u32 now = ticks_ms;
        if (now - last > maxgap) maxgap = now - last;
        last = now;
        u64 cnow = rdtsc();
        if (cnow < clast) tsc_back++;
        else if (cnow - clast > cmaxgap) cmaxgap = cnow - clast;
        clast = cnow;
        if (trace) { puts_("b"); nl(); }
    }
    u64 cend = rdtsc();
    u32 ms = ticks_ms - t0, tsc_k = cend > c0 ? (u32)((cend - c0) >> 10) : 0;
    io_sectors = 1;
    puts_("B "); puts_(d->name); putc_(' '); puts_(a[1]); putc_(' '); puts_(a[2]); putc_(' '); puts_(a[3]);
    kv("sectors", sectors); kv("count", count); kv("ok", ok); kv("errors", errors); kv("ms", ms);
    kv("maxgap_ms", maxgap); kv("tsc_k", tsc_k); kv("maxgap_tsc_k", (u32)(cmaxgap >> 10));
    kv("tsc_back", tsc_back); nl();
    running = was_running;
    for (int i = 0; i < NDISKS; i++) disks[i].credit = 0;
}

static void command(char *line) {
    u32 n;
    if (!strcmp_(line, "p")) { running = 0; pause_reported = 0; }
    else if (!strcmp_(line, "r")) { running = 1; for (int i = 0; i < NDISKS; i++) disks[i].credit = 0; say("running"); }
    else if (!memcmp(line, "rate ", 5) && parse_u32(line + 5, &n)) {
        if (n > MAX_RATE) { puts_("S error rate-too-high"); nl(); return; }
        P.rate = n;
        puts_("S rate"); putc_(' '); putu(n); nl();
    }
    else if (!strcmp_(line, "v")) verify();
    else if (!strcmp_(line, "q")) quit();
    else if (!strcmp_(line, "s")) stats();
    else if (!strcmp_(line, "mode alt")) { ide_mode = 0; say("mode alt"); }
    else if (!strcmp_(line, "mode pio")) { ide_mode = 1; say("mode pio"); }
    else if (!strcmp_(line, "mode dma")) { ide_mode = 2; say("mode dma"); }
    else if (!memcmp(line, "bench ", 6)) bench(line + 6);
    else { puts_("S error unknown-command"); nl(); }
}

static char line[40];
static u32 line_len;
static int line_overflow;

static void serial_poll(void) {
    while (inb(COM1 + 5) & 1) {
        char c = (char)inb(COM1);
        if (c == '\r' || c == '\n') {
            line[line_len] = 0;
            if (line_overflow) { puts_("S error line-too-long"); nl(); }
            else if (line_len) command(line);
            line_len = 0;
            line_overflow = 0;
        } else if (line_len < sizeof line - 1) {
            line[line_len++] = c;
        } else {
            line_overflow = 1;
        }
    }
}

/* ---- start-up ---- */
static u8 cmos(u8 reg) { outb(0x70, reg); return inb(0x71); }

static void make_run_id(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    u8 seed[12] = { cmos(0), cmos(2), cmos(4), cmos(7), cmos(8), cmos(9) };
    memcpy(seed + 4, &lo, 4);
    memcpy(seed + 8, &hi, 4);
    run_id = crc32(seed, sizeof seed) | 1; /* never 0 */
}

static void find_disks(void) {
    u32 ide_bdf = 0xFFFFFFFFu, vd_bdf = 0xFFFFFFFFu;
    for (u32 bdf = 0; bdf < 256; bdf++) {
        u32 id = pci_read32(bdf, 0);
        if ((id & 0xFFFF) == 0xFFFF) continue;
        u32 cls = pci_read32(bdf, 8) >> 16;
        if (cls == 0x0101 && ide_bdf == 0xFFFFFFFFu) ide_bdf = bdf; /* mass storage, IDE */
        if ((id == 0x10011AF4u || id == 0x10421AF4u) && vd_bdf == 0xFFFFFFFFu) vd_bdf = bdf; /* virtio-blk */
        if ((bdf & 7) == 0 && !(pci_read8(bdf, 0x0E) & 0x80)) bdf += 7; /* single-function */
    }
    struct disk *d = &disks[DISK_IDE];
    int r = ide_bdf == 0xFFFFFFFFu ? -100 : ide_init(ide_bdf);
    if (r == 0) {
        d->present = 1;
        d->sectors = ide_sectors();
        d->irq = IDE_IRQ;
        puts_("S disk ide pci="); put_bdf(ide_bdf); puts_(" bm=0x"); putx(ide_bm_base(), 4);
        kv("irq", IDE_IRQ); kv("sectors", d->sectors); kv("dma", ide_bm_base() != 0); nl();
    } else {
        puts_("S nodisk ide"); kv("reason", (u32)-r); nl();
    }
    d = &disks[DISK_VD];
    r = vd_bdf == 0xFFFFFFFFu ? -100 : vd_init(vd_bdf, (P.flags & PF_VIRTIO_MODERN) != 0);
    if (r == 0) {
        d->present = 1;
        d->sectors = vd_sectors();
        d->irq = vd_irq_line();
        puts_("S disk vd pci="); put_bdf(vd_bdf);
        puts_(vd_modern() ? " transport=modern" : " transport=legacy");
        puts_(" io=0x"); putx(vd_io_base(), 4);
        kv("irq", d->irq); kv("sectors", d->sectors); kv("flush", vd_can_flush());
        kv("queue", vd_queue_size()); nl();
    } else {
        puts_("S nodisk vd"); kv("reason", (u32)-r); nl();
    }
}

void dw_main(const struct params *boot_params) {
    extern u8 _bss_start[], _bss_end[];
    extern const u32 _payload_dwords[];
    memset(_bss_start, 0, (size_t)(_bss_end - _bss_start));
    /* The build makes the loaded sectors sum to 0 (as u32 words): catches a bad disk read. */
    u32 sum = 0;
    for (const u32 *p = (const u32 *)0x7E00; p < (const u32 *)0x7E00 + (u32)_payload_dwords; p++) sum += *p;
    if (sum) fatal("payload checksum", sum);
    P = *boot_params;
    if (memcmp(P.magic, "DWPARAMS", 8)) fatal("parameter block magic", 0);
    if (P.region_count == 0 || P.region_count > MAX_REGION) fatal("region_count", P.region_count);
    if (P.rate > MAX_RATE) fatal("rate", P.rate);
    if (P.region_start < IMAGE_SECTORS) fatal("region_start overlaps the boot sectors", P.region_start);
    crc_init();
    interrupts_init();
    outb(COM1 + 1, 0); /* COM1 polled both ways */
    sti();
    make_run_id();
    ide_mode = P.ide_mode <= 2 ? (int)P.ide_mode : 0;
    puts_("S hello diskwriter"); kv("version", VERSION); puts_(" run="); putx(run_id, 8);
    kv("region", P.region_start); kv("count", P.region_count); kv("rate", P.rate);
    kv("flush_every", P.flush_every); kv("ide_mode", (u32)ide_mode); kv("flags", P.flags); nl();
    disks[DISK_IDE].name = "ide";
    disks[DISK_IDE].id = DISK_IDE;
    disks[DISK_VD].name = "vd";
    disks[DISK_VD].id = DISK_VD;
    find_disks();
    for (int i = 0; i < NDISKS; i++) {
        struct disk *d = &disks[i];
        d->done_seq = done_tab[i];
        d->buf = bufs[i];
        if (!d->present) continue;
        if (P.region_start + P.region_count > d->sectors) {
            puts_("S nodisk "); puts_(d->name); puts_(" reason=small"); nl();
            d->present = 0;
            continue;
        }
        d->use_irq = !(P.flags & PF_NO_IRQ) && d->irq > 0 && d->irq < 16;
        if (d->use_irq) pic_unmask(d->irq);
        else { puts_("S polling "); puts_(d->name); nl(); }
    }
    /* A level-triggered PCI line must be level in the ELCR too (the BIOS sets it; say so). */
    if (disks[DISK_VD].present && disks[DISK_VD].use_irq) {
        u32 irq = disks[DISK_VD].irq;
        u16 port = irq < 8 ? 0x4D0 : 0x4D1;
        u8 bit = (u8)(1 << (irq & 7));
        if (!(inb(port) & bit)) outb(port, inb(port) | bit);
    }
    if (!disks[0].present && !disks[1].present) fatal("no disk to write", 0);
    running = !(P.flags & PF_START_PAUSED);
    pause_reported = 1;
    say(running ? "running" : "paused");
    u32 last_tick = ticks_ms;
    for (;;) {
        serial_poll();
        service_all();
        u32 now = ticks_ms, dt = now - last_tick;
        last_tick = now;
        if (dt > 1000) dt = 1000;
        int work = 0;
        for (int i = 0; i < NDISKS; i++) {
            struct disk *d = &disks[i];
            if (!d->present || d->busy || !running) continue;
            if (P.rate) {
                d->credit += dt * P.rate;
                if (d->credit > 1000 + P.rate * 50) d->credit = 1000 + P.rate * 50; /* 50 ms burst */
                if (d->credit < 1000) continue;
                d->credit -= 1000;
            }
            if (P.flush_every && d->since_flush >= P.flush_every && can_flush(d)) {
                if (P.rate) d->credit += 1000; /* flushes are free */
                issue_flush(d);
            } else {
                issue_write(d);
            }
            work = 1;
        }
        if (!running && !pause_reported && !any_busy()) { say("paused"); pause_reported = 1; }
        if (work || (running && !P.rate)) continue;
        cli();
        if (inb(COM1 + 5) & 1) sti(); else idle();
    }
}
