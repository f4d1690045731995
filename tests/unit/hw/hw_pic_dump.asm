; 8259 probe: edges from PIT/i8042/UART/RTC latched with IF=0, then acknowledged with the poll
; command: priorities, specific/non-specific/rotating EOI, special mask, AEOI rotation, ICW1 with
; requests pending.  Results are buffered and printed at the end (printing makes UART IRQs).
bits 16
org 0
%macro OUTB 2
    mov al, %2
    out %1, al
%endmacro
%macro RD 1
    in al, %1
    call rec
%endmacro
%macro POLL 1               ; OCW3 poll on chip base %1, print the poll byte
    mov al, 0x0C
    out %1, al
    in al, %1
    call rec
%endmacro
%macro ISR 1
    mov al, 0x0B
    out %1, al
    in al, %1
    call rec
    mov al, 0x0A
    out %1, al
%endmacro
%macro SEP 0
    mov al, 0xEE
    call rec
%endmacro
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov word [0x8FE], 0
    mov ah, 0x01
    call pic_init
    call make_irqs
    RD 0x20                 ; IRR (read select after init: IRR)
    RD 0xA0
    SEP
    OUTB 0x21, 0x00
    OUTB 0xA1, 0x00
    POLL 0x20               ; IRQ0
    ISR 0x20
    POLL 0x20               ; blocked by IRQ0 in service
    OUTB 0x20, 0x60         ; specific EOI 0
    POLL 0x20               ; IRQ1
    OUTB 0x20, 0x20
    OUTB 0x20, 0xC3         ; set priority: IRQ3 lowest -> IRQ4 highest
    POLL 0x20               ; IRQ4
    OUTB 0x20, 0x20
    POLL 0x20               ; IRQ2 (cascade)
    POLL 0xA0               ; IRQ8 on the slave
    ISR 0x20
    ISR 0xA0
    OUTB 0xA0, 0x20
    OUTB 0x20, 0x20
    POLL 0x20
    SEP
    ; special mask mode: IRQ0 in service blocks IRQ1 until masked + SMM
    OUTB 0x20, 0xC7         ; back to IRQ0 highest
    call make_irqs
    POLL 0x20               ; IRQ0 in service
    POLL 0x20               ; nothing: 1 is below 0
    OUTB 0x21, 0x01         ; mask IRQ0
    OUTB 0x20, 0x68         ; set special mask
    POLL 0x20               ; IRQ1 now
    OUTB 0x20, 0x48         ; reset special mask
    ISR 0x20
    OUTB 0x20, 0x20         ; non-specific EOI takes the highest in service: 0? (masked)
    ISR 0x20
    OUTB 0x20, 0x20
    ISR 0x20
    OUTB 0x21, 0x00
    POLL 0x20
    OUTB 0x20, 0x20
    POLL 0x20
    OUTB 0x20, 0x20
    POLL 0xA0
    OUTB 0xA0, 0x20
    SEP
    ; rotate on non-specific EOI
    call make_irqs
    POLL 0x20               ; 0
    OUTB 0x20, 0xA0         ; rotate on non-specific EOI -> 0 lowest
    POLL 0x20               ; 1
    OUTB 0x20, 0xE1         ; rotate on specific EOI 1 -> 1 lowest, 2 highest
    POLL 0x20               ; 2
    POLL 0xA0
    OUTB 0xA0, 0x20
    OUTB 0x20, 0x20
    POLL 0x20               ; 4
    OUTB 0x20, 0x20
    SEP
    ; automatic EOI with rotation
    mov ah, 0x03
    call pic_init
    OUTB 0x21, 0x00
    OUTB 0xA1, 0x00
    OUTB 0x20, 0x80         ; rotate in AEOI mode: set
    call make_irqs
    POLL 0x20
    ISR 0x20
    POLL 0x20
    POLL 0x20
    POLL 0x20
    POLL 0xA0
    POLL 0x20
    SEP
    ; ICW1 while requests are pending: edge requests dropped
    call make_irqs
    mov ah, 0x01
    call pic_init
    RD 0x20
    RD 0xA0
    RD 0x21
    mov dx, 0x3F9
    mov al, 0
    out dx, al
    mov cx, [0x8FE]
    mov si, 0x900
.p: mov al, [si]
    inc si
    cmp al, 0xEE
    jne .hx
    mov al, '|'
    call putc
    jmp .n
.hx: call hex8
.n: loop .p
    mov al, 10
    call putc
    mov dx, 0x501
    mov al, 0
    out dx, al
.h: hlt
    jmp .h

; raise edges on IRQ 0 (PIT one-shot), 1 (i8042 output buffer), 4 (UART THRE), 8 (RTC periodic)
make_irqs:
    ; drain the keyboard output buffer and its line
.k: in al, 0x64
    test al, 1
    jz .k0
    in al, 0x60
    jmp .k
.k0:
    mov al, 0x43 | 0x00
    out 0x64, al            ; (harmless: 0x43 is an unused command)
    mov al, 0x38
    out 0x43, al
    mov al, 0x00
    out 0x40, al
    mov al, 0x01
    out 0x40, al            ; IRQ 0 after 256 ticks
    mov al, 0xD2
    out 0x64, al
    mov al, 0x11
    out 0x60, al            ; IRQ 1
    mov dx, 0x3F9
    mov al, 0
    out dx, al
    mov dx, 0x3FC
    mov al, 0x08
    out dx, al
    mov dx, 0x3F9
    mov al, 2
    out dx, al              ; IRQ 4
    mov dx, 0x3FA
    in al, dx               ; clear THRE pending (line drops, edge already latched)
    mov al, 0x0B
    out 0x70, al
    mov al, 0x42
    out 0x71, al            ; PIE at 1024 Hz
    mov cx, 10              ; QEMU's timers may lag a busy vCPU: give them 10 ms
.d: call delay
    loop .d
    mov al, 0x0A            ; ... and on a loaded host wait (up to ~2 s) for both edges:
    out 0x20, al            ; master IRR bit 0 (PIT) and slave IRR bit 0 (RTC)
    out 0xA0, al
    mov cx, 2000
.e: in al, 0x20
    mov ah, al
    in al, 0xA0
    and al, ah
    test al, 0x01
    jnz .f
    call delay
    loop .e
.f:
    mov al, 0x0C
    out 0x70, al
    in al, 0x71             ; clear IRQ 8 line
    mov al, 0x0B
    out 0x70, al
    mov al, 0x02
    out 0x71, al
    mov al, 0x0C
    out 0x70, al
    in al, 0x71
    ret

delay:                      ; ~1 ms on PIT channel 2
    in al, 0x61
    and al, 0xFC
    or al, 1
    out 0x61, al
    mov al, 0xB0
    out 0x43, al
    mov al, 0xA9
    out 0x42, al
    mov al, 0x04
    out 0x42, al
.w: in al, 0x61
    test al, 0x20
    jz .w
    ret

pic_init:                   ; AH = ICW4
    OUTB 0x20, 0x11
    OUTB 0x21, 0x20
    OUTB 0x21, 0x04
    mov al, ah
    out 0x21, al
    OUTB 0xA0, 0x11
    OUTB 0xA1, 0x28
    OUTB 0xA1, 0x02
    mov al, ah
    out 0xA1, al
    OUTB 0x21, 0xFF
    OUTB 0xA1, 0xFF
    ret

rec:                        ; record AL for printing at the end
    push bx
    mov bx, [0x8FE]
    mov [0x900 + bx], al
    inc word [0x8FE]
    pop bx
    ret
%include "hw_rom_io.inc"
