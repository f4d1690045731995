; Platform register dump: resets values, probes and quirks of every platform device, printed in hex
; on COM1, then isa-debug-exit.  Run as -bios on qemu-system-x86_64 and on emu; outputs must match.
bits 16
org 0
%macro PUTS 1
    jmp %%after
%%s: db %1, 0
%%after:
    mov si, %%s
    call puts
%endmacro
%macro INB 1
    mov dx, %1
    in al, dx
    call hex8
%endmacro
%macro OUTB 2
    mov dx, %1
    mov al, %2
    out dx, al
%endmacro
%macro CMOS 1
    mov al, %1
    out 0x70, al
    in al, 0x71
    call hex8
%endmacro
%macro CFG 1
    mov eax, %1
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    call hex32
%endmacro

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000
    ; capture UART reset state before we use it
    mov di, 0x600
%assign r 0
%rep 8
    mov dx, 0x3F8 + r
    in al, dx
    mov [di + r], al
%assign r r + 1
%endrep
    mov cx, 8
    mov si, 0x600
    push cs
    pop ds
    xor ax, ax
    mov ds, ax
    PUTS "uart0:"
    mov si, 0x600
    mov cx, 8
.u: lodsb
    call hex8
    loop .u
    call nl
    PUTS "uart1:"
    OUTB 0x3FA, 0x07
    INB 0x3FA
    OUTB 0x3FA, 0xC7
    INB 0x3FA
    OUTB 0x3FB, 0x83
    mov dx, 0x3F8
    in al, dx
    mov [0x610], al
    mov dx, 0x3F9
    in al, dx
    mov [0x611], al
    OUTB 0x3F8, 0x01
    OUTB 0x3F9, 0x00
    mov dx, 0x3F8
    in al, dx
    mov [0x612], al
    OUTB 0x3FB, 0x03
    mov al, [0x610]
    call hex8
    mov al, [0x611]
    call hex8
    mov al, [0x612]
    call hex8
    INB 0x3FB
    OUTB 0x3FF, 0xA5
    INB 0x3FF
    OUTB 0x3F9, 0xFF
    INB 0x3F9
    OUTB 0x3F9, 0x00
    ; loopback: capture, print afterwards (output is looped back meanwhile)
    OUTB 0x3FC, 0x1A
    mov dx, 0x3FE
    in al, dx
    mov [0x620], al
    in al, dx
    mov [0x621], al
    OUTB 0x3FC, 0x1F
    mov dx, 0x3FE
    in al, dx
    mov [0x622], al
    in al, dx
    mov [0x623], al
    OUTB 0x3F8, 0x5A
    mov dx, 0x3FD
    in al, dx
    mov [0x624], al
    mov dx, 0x3F8
    in al, dx
    mov [0x625], al
    mov dx, 0x3FD
    in al, dx
    mov [0x626], al
    OUTB 0x3FC, 0x03
    mov dx, 0x3FE
    in al, dx
    mov [0x627], al
    in al, dx
    mov [0x628], al
    mov si, 0x620
    mov cx, 9
.l: lodsb
    call hex8
    loop .l
    INB 0x3FC
    INB 0x3FA
    OUTB 0x3F9, 0x02
    INB 0x3FA
    INB 0x3FA
    OUTB 0x3F9, 0x00
    OUTB 0x3FA, 0x00
    call nl
    PUTS "pic:"
    INB 0x21
    INB 0xA1
    INB 0x4D0
    INB 0x4D1
    OUTB 0x4D0, 0xFF
    OUTB 0x4D1, 0xFF
    INB 0x4D0
    INB 0x4D1
    OUTB 0x4D0, 0x00
    OUTB 0x4D1, 0x00
    OUTB 0x20, 0x11
    OUTB 0x21, 0x20
    OUTB 0x21, 0x04
    OUTB 0x21, 0x01
    OUTB 0xA0, 0x11
    OUTB 0xA1, 0x28
    OUTB 0xA1, 0x02
    OUTB 0xA1, 0x01
    INB 0x21
    OUTB 0x21, 0xFB
    INB 0x21
    OUTB 0xA1, 0xFF
    OUTB 0x20, 0x0B
    INB 0x20
    OUTB 0x20, 0x0A
    call nl
    PUTS "pit:"
    OUTB 0x61, 0x01
    OUTB 0x43, 0xB0
    OUTB 0x42, 0x34
    OUTB 0x42, 0x12
    OUTB 0x43, 0xE8
    INB 0x42
    OUTB 0x43, 0x94
    OUTB 0x42, 0x10
    OUTB 0x43, 0xE8
    INB 0x42
    OUTB 0x43, 0x96
    OUTB 0x43, 0xE8
    in al, 0x42
    and al, 0x7F            ; OUT: the old count keeps running in the new mode, phase is random
    call hex8
    OUTB 0x43, 0xE2
    in al, 0x40
    and al, 0x7F
    call hex8
    INB 0x43
    in al, 0x61
    and al, 0x0F
    call hex8
%assign m 0
%rep 6
    OUTB 0x61, 0x00
    OUTB 0x43, 0xB0 | (m << 1)
    OUTB 0x42, 0xFF
    OUTB 0x42, 0xFF
    OUTB 0x43, 0xE8
    INB 0x42
    in al, 0x61
    and al, 0x2F
    call hex8
    OUTB 0x61, 0x01
    OUTB 0x43, 0xE8
    INB 0x42
    in al, 0x61
    and al, 0x2F
    call hex8
%assign m m + 1
%endrep
    OUTB 0x43, 0x80
    in al, 0x42
    mov bl, al
    in al, 0x42
    mov bh, al
    cmp bx, 0xF000
    seta al
    call hex8
    OUTB 0x43, 0xB0
    OUTB 0x42, 0x00
    OUTB 0x43, 0xE8
    INB 0x42
    OUTB 0x42, 0x80
    OUTB 0x43, 0xE8
    INB 0x42
    call nl
    PUTS "cmos:"
    mov al, 0x0A
    out 0x70, al
    in al, 0x71
    and al, 0x7F
    call hex8
    CMOS 0x0B
    mov al, 0x0C
    out 0x70, al
    in al, 0x71
    and al, 0xEF            ; UF depends on when the second ticked
    call hex8
    CMOS 0x0D
    CMOS 0x0F
%assign r 0x10
%rep 0x30
    CMOS r
%assign r r + 1
%endrep
    CMOS 0x5B
    CMOS 0x5C
    CMOS 0x5D
    CMOS 0x5F
    CMOS 0x32
    CMOS 0x37
    INB 0x70
    call nl
    PUTS "kbc:"
    INB 0x64
    INB 0x92
    OUTB 0x64, 0x20
    INB 0x64
    INB 0x60
    OUTB 0x64, 0xAA
    INB 0x60
    INB 0x64
    OUTB 0x64, 0xD0
    INB 0x60
    OUTB 0x64, 0xAB
    INB 0x60
    call nl
    PUTS "misc:"
    INB 0x80
    INB 0x501
    INB 0x2F8
    mov dx, 0x2F8
    in ax, dx
    call hex16
    in eax, dx
    call hex32
    INB 0xCF9
    call nl
    PUTS "pci00:"
%assign r 0
%rep 16
    CFG 0x80000000 + r
%assign r r + 4
%endrep
    CFG 0x80000058
    CFG 0x8000005C
    CFG 0x80000070
    call nl
    PUTS "pci08:"
%assign r 0
%rep 16
    CFG 0x80000800 + r
%assign r r + 4
%endrep
%assign r 0x40
%rep 48
    CFG 0x80000800 + r
%assign r r + 4
%endrep
    call nl
    PUTS "pcibar:"
    CFG 0x80010000
    CFG 0x80001000
    CFG 0x80000500
    mov dx, 0xCF8
    in eax, dx
    call hex32
    mov eax, 0x80000800
    out dx, eax
    mov dx, 0xCFE
    in ax, dx
    call hex16
    mov dx, 0xCFF
    in al, dx
    call hex8
    mov dx, 0xCFB
    mov al, 1
    out dx, al
    mov dx, 0xCF8
    in eax, dx
    call hex32
    mov eax, 0x80000860
    out dx, eax
    mov dx, 0xCFC
    mov eax, 0x0B0B0A0A
    out dx, eax
    in eax, dx
    call hex32
    call nl
    PUTS "end"
    call nl
    mov dx, 0x501
    mov al, 0
    out dx, al
.hang:
    hlt
    jmp .hang
%include "hw_rom_io.inc"
