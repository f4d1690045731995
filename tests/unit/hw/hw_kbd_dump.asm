; i8042 probe: controller commands, PS/2 keyboard and mouse replies (with and without
; translation), status bits; each reply sequence printed in hex on COM1, '|' after each.
bits 16
org 0
%macro KCMD 1               ; controller command
    mov al, %1
    out 0x64, al
%endmacro
%macro KDAT 1
    mov al, %1
    out 0x60, al
%endmacro
%macro DRAIN 0              ; print every byte the controller offers, then '|'
    call drain
%endmacro
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    in al, 0x64
    call hex8
    DRAIN
    KCMD 0xAA
    DRAIN
    KCMD 0x20
    DRAIN
    KCMD 0x60
    KDAT 0x47
    KCMD 0x20
    DRAIN
    KCMD 0xAB
    DRAIN
    KCMD 0xA9
    DRAIN
    KCMD 0xC0
    DRAIN
    KCMD 0xD0
    DRAIN
    KCMD 0xE0
    DRAIN
    KDAT 0xFF
    DRAIN
    KDAT 0xF2
    DRAIN
    KDAT 0xED
    DRAIN
    KDAT 0x07
    DRAIN
    KDAT 0xEE
    DRAIN
    KDAT 0xF0
    DRAIN
    KDAT 0x00
    DRAIN
    KDAT 0xF4
    DRAIN
    KDAT 0x99
    DRAIN
    KCMD 0xA8
    KCMD 0x20
    DRAIN
    KCMD 0xD4
    KDAT 0xF2
    DRAIN
    KCMD 0xD4
    KDAT 0xFF
    DRAIN
    KCMD 0xD4
    KDAT 0xE9
    DRAIN
    KCMD 0xD4
    KDAT 0xF3
    DRAIN
    KCMD 0xD4
    KDAT 0xC8
    DRAIN
    KCMD 0xD4
    KDAT 0xE9
    DRAIN
    KCMD 0xD3
    KDAT 0x5A
    in al, 0x64
    call hex8
    DRAIN
    KCMD 0xD2
    KDAT 0x1C
    in al, 0x64
    call hex8
    DRAIN
    KCMD 0xA7
    KCMD 0x20
    DRAIN
    KCMD 0xAD
    KCMD 0x20
    DRAIN
    KCMD 0xAE
    KCMD 0x20
    DRAIN
    in al, 0x64
    call hex8
    mov al, 10
    call putc
    mov dx, 0x501
    mov al, 0
    out dx, al
.h: hlt
    jmp .h

drain:
    push cx
.again:
    mov cx, 2000
.w: in al, 0x64
    test al, 1
    jnz .got
    loop .w
    mov al, '|'
    call putc
    pop cx
    ret
.got:
    test al, 0x20
    jz .k
    mov al, 'm'
    call putc
.k: in al, 0x60
    call hex8
    jmp .again
%include "hw_rom_io.inc"
