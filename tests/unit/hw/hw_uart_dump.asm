; 16550A probe in loopback: FIFO trigger levels, character timeout (CTI) set/clear rules, overrun
; with and without FIFO, receiver clear; results buffered, printed once the UART is back to normal.
bits 16
org 0
%macro OUTB 2
    mov dx, %1
    mov al, %2
    out dx, al
%endmacro
%macro RD 1
    mov dx, %1
    in al, dx
    call rec
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
    ; 150 baud 8N1 (divisor 768: 4 characters = 267 ms, so the checks made right after a write
    ; or read never race the character timeout, even on a loaded host), FIFO on with trigger 4,
    ; loopback, RX data + line status interrupts enabled
    OUTB 0x3FB, 0x83
    OUTB 0x3F8, 0x00
    OUTB 0x3F9, 0x03
    OUTB 0x3FB, 0x03
    OUTB 0x3FA, 0x47
    OUTB 0x3FC, 0x10
    OUTB 0x3F9, 0x05
    RD 0x3FA
    RD 0x3FD
    SEP
    OUTB 0x3F8, 0x61
    OUTB 0x3F8, 0x62
    OUTB 0x3F8, 0x63
    RD 0x3FA                ; below trigger, no timeout yet
    RD 0x3FD
    call delay10
    RD 0x3FA                ; character timeout
    RD 0x3F8
    RD 0x3FA                ; timeout cleared by the read
    call delay10
    RD 0x3FA                ; times out again
    SEP
    OUTB 0x3F8, 0x64
    OUTB 0x3F8, 0x65
    OUTB 0x3F8, 0x66
    RD 0x3FA                ; 5 bytes >= 4: received data available
    mov cx, 5
.r: RD 0x3F8
    loop .r
    RD 0x3FA
    RD 0x3FD
    SEP
    ; overrun: 20 bytes into a 16-byte FIFO
    mov cx, 20
    mov bl, 0x40
.o: mov dx, 0x3F8
    mov al, bl
    out dx, al
    inc bl
    loop .o
    RD 0x3FA                ; line status interrupt
    RD 0x3FD                ; OE, cleared by this read
    RD 0x3FA
    RD 0x3FD
    mov cx, 17
.d: RD 0x3F8
    loop .d
    RD 0x3FD
    SEP
    ; FIFO off: one-byte receiver, overrun keeps... which byte?
    OUTB 0x3FA, 0x00
    RD 0x3FA
    OUTB 0x3F8, 0x31
    OUTB 0x3F8, 0x32
    RD 0x3FA
    RD 0x3FD
    RD 0x3F8
    RD 0x3FD
    SEP
    ; FCR clear-receiver with data queued
    OUTB 0x3FA, 0x01
    OUTB 0x3F8, 0x71
    OUTB 0x3F8, 0x72
    RD 0x3FD
    OUTB 0x3FA, 0x03
    RD 0x3FD
    RD 0x3FA
    ; trigger levels 1/8/14 with IER RDI
    OUTB 0x3FA, 0x07
    OUTB 0x3F8, 0x01
    RD 0x3FA
    OUTB 0x3FA, 0x87
    mov cx, 7
.t8: OUTB 0x3F8, 0x02
    loop .t8
    RD 0x3FA
    OUTB 0x3F8, 0x03
    RD 0x3FA
    OUTB 0x3FA, 0xC7
    mov cx, 13
.t14: OUTB 0x3F8, 0x04
    loop .t14
    RD 0x3FA
    OUTB 0x3F8, 0x05
    RD 0x3FA
    SEP
    ; leave loopback, FIFO off, interrupts off, then print
    OUTB 0x3FA, 0x07
    OUTB 0x3FA, 0x00
    OUTB 0x3F9, 0x00
    OUTB 0x3FC, 0x03
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

delay10:                    ; ~320 ms on PIT channel 2: past the 267 ms character timeout
    push cx
    mov cx, 320
.l: in al, 0x61
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
    loop .l
    pop cx
    ret
rec:
    push bx
    mov bx, [0x8FE]
    mov [0x900 + bx], al
    inc word [0x8FE]
    pop bx
    ret
%include "hw_rom_io.inc"
