; PCI write-mask probe: every config dword of 00:00.0 and 00:01.0 written with all ones, read back
; and restored (i440FX PAM/SMRAM skipped: they would unmap this ROM).
bits 16
org 0
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov ebx, 0x80000000          ; 00:00.0
    call probe_fn
    mov al, 10
    call putc
    mov ebx, 0x80000800          ; 00:01.0
    call probe_fn
    mov al, 10
    call putc
    mov dx, 0x501
    mov al, 0
    out dx, al
.h: hlt
    jmp .h

; for each dword register: skip the ones that would pull the ROM from under us (i440FX PAM,
; SMRAM), else write all ones, print what reads back, restore the old value
probe_fn:
    xor si, si
.next:
    cmp ebx, 0x80000000
    jne .ok
    cmp si, 0x58
    jb .ok
    cmp si, 0x74
    jb .skip
.ok:
    mov eax, ebx
    or ax, si
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    mov edi, eax                 ; old value
    mov eax, 0xFFFFFFFF
    out dx, eax
    in eax, dx
    call hex32
    mov eax, edi
    out dx, eax
    jmp .adv
.skip:
    mov al, '-'
    call putc
    mov al, ' '
    call putc
.adv:
    add si, 4
    cmp si, 0x100
    jb .next
    ret
%include "hw_rom_io.inc"
