; RTC probe: set the time under SET in BCD/24 h, read it back in binary and 12 h, ride the
; 1999 -> 2000 rollover, 12 AM / 12 PM in 12 h BCD, binary-mode set; printed in hex on COM1.
bits 16
org 0
%macro CMOSW 2
    mov al, %1
    out 0x70, al
    mov al, %2
    out 0x71, al
%endmacro
%macro CMOSR 1
    mov al, %1
    out 0x70, al
    in al, 0x71
    call hex8
%endmacro
%macro TIME 0
    call wait_uip
    CMOSR 0
    CMOSR 2
    CMOSR 4
    CMOSR 6
    CMOSR 7
    CMOSR 8
    CMOSR 9
    CMOSR 0x32
    mov al, '|'
    call putc
%endmacro
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    CMOSW 0x0B, 0x82
    CMOSW 0x00, 0x58
    CMOSW 0x02, 0x59
    CMOSW 0x04, 0x23
    CMOSW 0x06, 0x06
    CMOSW 0x07, 0x31
    CMOSW 0x08, 0x12
    CMOSW 0x09, 0x99
    CMOSW 0x32, 0x19
    CMOSR 0x0B
    CMOSW 0x0B, 0x02
    TIME
    CMOSW 0x0B, 0x06
    TIME
    CMOSW 0x0B, 0x04
    TIME
    CMOSW 0x0B, 0x00
    TIME
    ; wait for two updates: 23:59:58 -> 00:00:00 of 2000-01-01
    call wait_sec_change
    call wait_sec_change
    CMOSW 0x0B, 0x02
    TIME
    ; 12 h BCD: write 12 AM (midnight) and 12 PM (noon) and read in 24 h
    CMOSW 0x0B, 0x80
    CMOSW 0x04, 0x12
    CMOSW 0x0B, 0x02
    call wait_uip
    CMOSR 4
    CMOSW 0x0B, 0x80
    CMOSW 0x04, 0x92
    CMOSW 0x0B, 0x02
    call wait_uip
    CMOSR 4
    ; binary mode: set 1999-02-28 23:59:59 and read back in binary
    CMOSW 0x0B, 0x86
    CMOSW 0x00, 59
    CMOSW 0x02, 59
    CMOSW 0x04, 23
    CMOSW 0x07, 28
    CMOSW 0x08, 2
    CMOSW 0x09, 99
    CMOSW 0x32, 19
    CMOSW 0x0B, 0x06
    TIME
    mov al, 10
    call putc
    mov dx, 0x501
    mov al, 0
    out dx, al
.h: hlt
    jmp .h

wait_uip:
    mov al, 0x0A
    out 0x70, al
.w: in al, 0x71
    test al, 0x80
    jnz .w
    ret
wait_sec_change:
    call wait_uip
    mov al, 0
    out 0x70, al
    in al, 0x71
    mov bl, al
.w: call wait_uip
    mov al, 0
    out 0x70, al
    in al, 0x71
    cmp al, bl
    je .w
    ret
%include "hw_rom_io.inc"
