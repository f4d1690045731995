; emu BIOS: a small PC BIOS for emu's `pc` machine (and QEMU's, where it is tested).
;
; Build: scripts/build-firmware (nasm -f bin); the result, firmware/bios.bin, is committed.
;
; Layout.  The image is 64 KiB.  QEMU (and emu, which follows it) maps a -bios image at
; 4 GiB - size and aliases its last 128 KiB below 1 MiB, so this whole image appears as
; segment F000 (0xF0000-0xFFFFF), read-only: every variable lives in RAM, in the BIOS data
; area (BDA, 0x400) or in the 1 KiB extended BIOS data area (EBDA, 0x9FC00).  The CPU starts
; at F000:FFF0, the far jump to `post` at the very end of this file.
;
; Map of the sources (all 16-bit real mode, 386+ instructions):
;   bios.asm           layout, constants, POST, interrupt vector table, reset vector
;   src/console.inc    COM1 16550 output/input, number printing, CMOS access
;   src/memory.inc     RAM size from CMOS -> E820 table; INT 12h, INT 15h E820/E801/88h
;   src/pci.inc        bus 0 enumeration, BAR sizing/assignment, IRQ lines, PIRQ, ELCR
;   src/ata.inc        ATA PIO: channel reset, IDENTIFY, sector read/write
;   src/virtio.inc     virtio-blk-pci (modern interface) disks: set-up and requests
;   src/disk.inc       INT 13h for hard disks (CHS and EDD), drive geometry
;   src/services.inc   INT 08h/10h/11h/15h/16h/18h/19h/1Ah and the default handlers
;
; Design notes:
; - Everything is polled: the IDE channels run with nIEN set, as SeaBIOS does; only IRQ 0
;   (the 18.2 Hz tick) is unmasked at the PIC.
; - Interrupt services that return values use a register frame (ENTER_FRAME) and edit the
;   caller's saved registers and FLAGS in place, so CF/ZF reach the caller through IRET.
; - PCI resources, IRQ lines and disk geometry follow SeaBIOS's rules for QEMU so that a
;   guest sees the same machine with either firmware (tests/guests/firmware compare both).

        cpu     686
        bits    16
        org     0                       ; offsets are relative to segment F000

BIOS_SEG        equ     0xF000
BIOS_SIZE       equ     0x10000         ; bytes; reserved at 4 GiB - BIOS_SIZE in E820

; ---- BIOS data area (segment 0 offsets) --------------------------------------------------
BDA_COM1        equ     0x400           ; I/O base of COM1..COM4 (words)
BDA_EBDA_SEG    equ     0x40E           ; segment of the EBDA
BDA_EQUIPMENT   equ     0x410           ; INT 11h equipment word
BDA_MEM_KB      equ     0x413           ; INT 12h conventional memory in KiB
BDA_KBD_FLAGS   equ     0x417           ; shift flags (INT 16h AH=02h)
BDA_KBD_HEAD    equ     0x41A           ; keyboard ring: offsets relative to 0x400
BDA_KBD_TAIL    equ     0x41C
BDA_KBD_BUF     equ     0x41E
BDA_FLOPPY_STAT equ     0x441           ; last floppy status (INT 13h AH=01h, DL<80h)
BDA_VIDEO_MODE  equ     0x449
BDA_VIDEO_COLS  equ     0x44A
BDA_TICKS       equ     0x46C           ; dword: ticks since midnight (INT 1Ah AH=00h)
BDA_MIDNIGHT    equ     0x470           ; byte: midnight passed since last read
BDA_DISK_STAT   equ     0x474           ; last hard disk status (INT 13h AH=01h)
BDA_HDCOUNT     equ     0x475           ; number of hard disks
BDA_COM_TIMEOUT equ     0x47C
BDA_KBD_START   equ     0x480           ; keyboard ring bounds (offsets relative to 0x400)
BDA_KBD_END     equ     0x482
BDA_VIDEO_ROWS  equ     0x484

TICKS_PER_DAY   equ     0x1800B0        ; 24 h of 65536/1193182 s ticks

; ---- extended BIOS data area (offsets inside its segment) -------------------------------
EBDA_SEG        equ     0x9FC0          ; 639 KiB: the top KiB of conventional memory
EBDA_KB         equ     1
EBDA_DRIVES     equ     0x010           ; MAX_DRIVES x DRIVE_SIZE, see src/ata.inc
MAX_DRIVES      equ     8               ; up to 4 ATA disks, then virtio-blk disks
DRIVE_SIZE      equ     32
EBDA_E820_COUNT equ     0x110           ; word
EBDA_RAM_TOP    equ     0x114           ; dword: end of RAM below 4 GiB
EBDA_RAM_HIGH   equ     0x118           ; dword: RAM above 4 GiB in 64 KiB units
EBDA_IO_LBA     equ     0x11C           ; qword: the disk request's next LBA
EBDA_IO_LEFT    equ     0x124           ; word: sectors still to transfer
EBDA_IO_DONE    equ     0x126           ; word: sectors transferred
EBDA_IO_WRITE   equ     0x128           ; byte: 1 = write
EBDA_IDE_BDF    equ     0x12A           ; word: PCI address of the IDE controller (FFFF: none)
EBDA_VIO_CAP    equ     0x12C           ; byte: virtio PCI configuration access capability
EBDA_VIO_BAR    equ     0x12D           ; byte: BAR the access window points into
EBDA_E820       equ     0x130           ; E820_MAX entries of 20 bytes
E820_MAX        equ     8
EBDA_VIO_HDR    equ     0x1D0           ; virtio-blk request header (16 bytes)
EBDA_VIO_STATUS equ     0x1E0           ; byte: virtio-blk request status
EBDA_VIO_RING   equ     0x1E2           ; words: the request's queue: segment, descriptors,
EBDA_VIO_DESC   equ     0x1E4           ;   available and used ring offsets, size - 1
EBDA_VIO_AVAILP equ     0x1E6
EBDA_VIO_USEDP  equ     0x1E8
EBDA_VIO_MASK   equ     0x1EA
EBDA_DPTE       equ     0x200           ; ATA_MAX x 16: EDD device parameter tables
ATA_MAX         equ     4
EBDA_VRINGS     equ     0x240           ; VIO_MAX x VRING_SIZE: virtqueues, see src/virtio.inc
VIO_MAX         equ     4
VRING_SIZE      equ     112
EBDA_END        equ     EBDA_VRINGS + VIO_MAX * VRING_SIZE

; ---- POST-only scratch in free conventional memory (below the boot sector) ---------------
SCRATCH_SEG     equ     0x0100          ; 0x1000: 512-byte IDENTIFY buffer, PCI BAR list
SCR_IDENTIFY    equ     0x0000
SCR_BARS        equ     0x0200          ; PCI_MAX_BARS x 8 bytes, see src/pci.inc

BOOT_ADDR       equ     0x7C00
POST_STACK      equ     0x7C00

; ---- register frame built by ENTER_FRAME (offsets from BP) ---------------------------------
F_EDI   equ 0
F_DI    equ 0
F_ESI   equ 4
F_SI    equ 4
F_EBP   equ 8
F_BP    equ 8
F_EBX   equ 16
F_BX    equ 16
F_BL    equ 16
F_BH    equ 17
F_EDX   equ 20
F_DX    equ 20
F_DL    equ 20
F_DH    equ 21
F_ECX   equ 24
F_CX    equ 24
F_CL    equ 24
F_CH    equ 25
F_EAX   equ 28
F_AX    equ 28
F_AL    equ 28
F_AH    equ 29
F_GS    equ 32
F_FS    equ 34
F_ES    equ 36
F_DS    equ 38
F_IP    equ 40
F_CS    equ 42
F_FLAGS equ 44

FLAG_CF equ 0x0001
FLAG_ZF equ 0x0040

%macro ENTER_FRAME 0
        push    ds
        push    es
        push    fs
        push    gs
        pushad
        mov     bp, sp
        cld
%endmacro

%macro LEAVE_FRAME 0
        popad
        pop     gs
        pop     fs
        pop     es
        pop     ds
        iret
%endmacro

%macro SET_CF 0
        or      byte [bp + F_FLAGS], FLAG_CF
%endmacro

%macro CLEAR_CF 0
        and     byte [bp + F_FLAGS], ~FLAG_CF & 0xFF
%endmacro

; PRINT "text": write a string to COM1; preserves all registers.
%macro PRINT 1
        push    si
        mov     si, %%text
        call    print_str
        pop     si
        jmp     %%after
%%text: db      %1, 0
%%after:
%endmacro

; ============================================================================================
; Power-on self test
; ============================================================================================
post:
        cli
        cld
        xor     ax, ax
        mov     ss, ax
        mov     sp, POST_STACK
        mov     ds, ax
        mov     es, ax

        ; BDA and the EBDA start out zeroed.
        mov     di, 0x400
        mov     cx, 0x100 / 2
        rep     stosw
        mov     ax, EBDA_SEG
        mov     es, ax
        xor     di, di
        xor     ax, ax
        mov     cx, EBDA_KB * 1024 / 2
        rep     stosw
        mov     byte [es:0], EBDA_KB    ; first byte of an EBDA: its size in KiB
        xor     ax, ax
        mov     es, ax

        call    ivt_setup
        call    bda_setup
        call    pic_setup
        call    lapic_setup
        call    pit_setup
        call    rtc_setup
        call    serial_setup

        PRINT   `\r\nemu BIOS 1.0\r\n`
        call    memory_setup
        call    pci_setup
        sti                             ; the tick runs from here on (disk timeouts use it)
        call    ata_setup
        call    virtio_setup
        int     0x19                    ; bootstrap; does not return

; IVT: every vector to an IRET, hardware IRQs to handlers that acknowledge the PIC, then the
; services this BIOS provides.
ivt_setup:
        xor     di, di
        mov     cx, 256
.all:   mov     word [di], dummy_iret
        mov     word [di + 2], BIOS_SEG
        add     di, 4
        loop    .all
        mov     di, 0x08 * 4
        mov     cx, 8
.pic1:  mov     word [di], irq_master_default
        add     di, 4
        loop    .pic1
        mov     di, 0x70 * 4
        mov     cx, 8
.pic2:  mov     word [di], irq_slave_default
        add     di, 4
        loop    .pic2
        mov     si, vector_table
.svc:   movzx   di, byte [cs:si]
        cmp     di, 0xFF
        je      .user
        shl     di, 2
        mov     ax, [cs:si + 1]
        mov     [di], ax
        add     si, 3
        jmp     .svc
.user:  ; INT 60h-67h belong to user programs and start as null pointers
        mov     di, 0x60 * 4
        mov     cx, 8 * 2
        xor     ax, ax
        rep     stosw
        ret

vector_table:
        db      0x08
        dw      int08_handler
        db      0x10
        dw      int10_handler
        db      0x11
        dw      int11_handler
        db      0x12
        dw      int12_handler
        db      0x13
        dw      int13_handler
        db      0x15
        dw      int15_handler
        db      0x16
        dw      int16_handler
        db      0x18
        dw      int18_handler
        db      0x19
        dw      int19_handler
        db      0x1A
        dw      int1a_handler
        db      0xFF

bda_setup:
        mov     word [BDA_COM1], COM1
        ; equipment: 1 serial port (bits 9-11), 80x25 colour display (bits 4-5), FPU (bit 1)
        mov     word [BDA_EQUIPMENT], (1 << 9) | (2 << 4) | (1 << 1)
        mov     word [BDA_MEM_KB], 640 - EBDA_KB
        mov     word [BDA_EBDA_SEG], EBDA_SEG
        mov     word [BDA_KBD_HEAD], BDA_KBD_BUF - 0x400
        mov     word [BDA_KBD_TAIL], BDA_KBD_BUF - 0x400
        mov     word [BDA_KBD_START], BDA_KBD_BUF - 0x400
        mov     word [BDA_KBD_END], BDA_KBD_BUF - 0x400 + 32
        mov     byte [BDA_VIDEO_MODE], 3
        mov     word [BDA_VIDEO_COLS], 80
        mov     byte [BDA_VIDEO_ROWS], 24
        mov     byte [BDA_COM_TIMEOUT], 1
        ret

; 8259 pair: master vectors 08h-0Fh, slave 70h-77h, cascade on IRQ 2; only IRQ 0 unmasked.
PIC1_CMD        equ     0x20
PIC1_DATA       equ     0x21
PIC2_CMD        equ     0xA0
PIC2_DATA       equ     0xA1
PIC_EOI         equ     0x20

pic_setup:
        mov     al, 0x11                ; ICW1: edge, cascade, ICW4 follows
        out     PIC1_CMD, al
        out     PIC2_CMD, al
        mov     al, 0x08                ; ICW2: vector bases
        out     PIC1_DATA, al
        mov     al, 0x70
        out     PIC2_DATA, al
        mov     al, 0x04                ; ICW3: slave on IRQ 2
        out     PIC1_DATA, al
        mov     al, 0x02                ; ICW3: slave identity 2
        out     PIC2_DATA, al
        mov     al, 0x01                ; ICW4: 8086 mode, normal EOI
        out     PIC1_DATA, al
        out     PIC2_DATA, al
        mov     al, ~((1 << 0) | (1 << 2)) & 0xFF
        out     PIC1_DATA, al
        mov     al, 0xFF
        out     PIC2_DATA, al
        ret

; Local APIC (when the CPU has one): software-enable it and make LINT0 ExtINT, LINT1 NMI, as
; SeaBIOS does.  At reset LINT0 is masked, and an enabled LAPIC with LINT0 masked keeps the
; 8259's interrupts from the CPU.  The registers sit at 0xFEE00000, beyond real mode: a short
; trip to 16-bit protected mode with a flat data segment writes them.
LAPIC_SVR       equ     0x0F0
LAPIC_LINT0     equ     0x350
LAPIC_LINT1     equ     0x360
LAPIC_SW_ENABLE equ     0x100
LVT_EXTINT      equ     0x8700          ; ExtINT, level
LVT_NMI         equ     0x8400          ; NMI, level
MSR_APIC_BASE   equ     0x1B

lapic_setup:
        mov     eax, 1
        cpuid
        test    edx, 1 << 9             ; CPUID.01h:EDX.APIC
        jz      .done
        test    edx, 1 << 5             ; ... and RDMSR (a #GP here would loop: the IVT
        jz      .done                   ; only has IRETs yet)
        mov     ecx, MSR_APIC_BASE
        rdmsr
        test    eax, 1 << 11            ; globally enabled?
        jz      .done
        and     eax, 0xFFFFF000
        mov     esi, eax
        push    ds
        o32 lgdt [cs:lapic_gdt_desc]
        mov     eax, cr0
        or      al, 1
        mov     cr0, eax
        jmp     0x08:.pm
.pm:    mov     ax, 0x10
        mov     ds, ax
        or      dword [esi + LAPIC_SVR], LAPIC_SW_ENABLE
        mov     dword [esi + LAPIC_LINT0], LVT_EXTINT
        mov     dword [esi + LAPIC_LINT1], LVT_NMI
        mov     eax, cr0
        and     al, 0xFE
        mov     cr0, eax
        jmp     BIOS_SEG:.rm
.rm:    pop     ds
.done:  ret

        align   8
lapic_gdt:                              ; accessed bits preset: the GDT is in ROM
        dq      0
        dq      0x00009B0F0000FFFF      ; 0x08: 16-bit code, base 0xF0000, limit 64 KiB
        dq      0x008F93000000FFFF      ; 0x10: data, base 0, limit 4 GiB
lapic_gdt_desc:
        dw      3 * 8 - 1
        dd      (BIOS_SEG << 4) + lapic_gdt

; 8254 channel 0: mode 2, divisor 65536 -> IRQ 0 at 18.2 Hz.
PIT_CH0         equ     0x40
PIT_MODE        equ     0x43

pit_setup:
        mov     al, 0x34                ; channel 0, lobyte/hibyte, mode 2, binary
        out     PIT_MODE, al
        xor     al, al
        out     PIT_CH0, al
        out     PIT_CH0, al
        ret

; MC146818: 32.768 kHz time base, 24-hour mode, no daylight saving, clear pending flags;
; then start the tick count at the RTC's time of day, as INT 1Ah AH=00h promises.
rtc_setup:
        mov     ah, CMOS_STATUS_A
        mov     al, 0x26
        call    cmos_write
        mov     al, CMOS_STATUS_B
        call    cmos_read
        and     al, ~0x01 & 0xFF        ; DSE off
        or      al, 0x02                ; 24-hour
        mov     ah, CMOS_STATUS_B
        call    cmos_write
        mov     al, CMOS_STATUS_C
        call    cmos_read
        mov     al, CMOS_STATUS_D
        call    cmos_read
        call    rtc_wait_update
        mov     al, CMOS_HOURS
        call    cmos_read_bcd
        movzx   eax, al
        imul    ebx, eax, 3600
        mov     al, CMOS_MINUTES
        call    cmos_read_bcd
        movzx   eax, al
        imul    eax, eax, 60
        add     ebx, eax
        mov     al, CMOS_SECONDS
        call    cmos_read_bcd
        movzx   eax, al
        add     eax, ebx
        cmp     eax, 86400
        jb      .ok
        xor     eax, eax                ; nonsense in the CMOS: start at midnight
.ok:    mov     ebx, 1193182            ; ticks = seconds * PIT Hz / 65536
        mul     ebx
        shrd    eax, edx, 16
        mov     [BDA_TICKS], eax
        ret

%include "src/console.inc"
%include "src/memory.inc"
%include "src/pci.inc"
%include "src/ata.inc"
%include "src/virtio.inc"
%include "src/disk.inc"
%include "src/services.inc"

; ============================================================================================
; Fixed tail: INT 15h AH=C0h configuration table and the reset vector
; ============================================================================================
config_table:
        dw      8                       ; bytes that follow
        db      0xFC                    ; model: AT
        db      0x00                    ; submodel
        db      0x01                    ; BIOS revision
        db      0x64                    ; feature 1: 2nd 8259, RTC, EBDA
        db      0x00                    ; feature 2
        db      0, 0, 0

end_of_code:
        times   0xFFF0 - ($ - $$) db 0xFF   ; (negative, an error, if the code grows too big)

reset_vector:                           ; F000:FFF0, where the CPU starts
        jmp     BIOS_SEG:post
        db      "12/02/26"              ; F000:FFF5 BIOS date
        db      0
        db      0xFC                    ; F000:FFFE model byte: AT
        db      0
