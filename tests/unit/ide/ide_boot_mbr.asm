; Boot sector for test_ide_boot.py: run by our BIOS (firmware/bios.bin) from an IDE disk on
; emu and on qemu-system-x86_64.  It reads through INT 13h (the BIOS's ATA PIO), then drives
; the PIIX3 bus master itself: READ DMA of a code sector over code it has already executed
; (the vCPU must drop its translation)
; Disk layout: LBA 0-3 this program, 4-11 text sectors, 12 the new code, 20-21 written., completion by IRQ 14 through the PIC, then WRITE DMA
; and a read back through INT 13h.  Output on COM1; isa-debug-exit at 0x501 ends the run.
bits 16
org 0x7c00
PRD     equ 0x6000
CODE    equ 0x9000
WBUF    equ 0xA000
RBUF    equ 0xB000
TEXT    equ 0xC000
FLAG    equ 0x500
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000
    mov si, msg_boot
    call puts
    ; --- the rest of this program: LBA 1..3 -> 0x7E00 ---
    mov dword [dap_lba], 1
    mov word [dap_buf], 0x7E00
    mov word [dap_cnt], 3
    mov ah, 0x42
    mov dl, 0x80
    mov si, dap
    int 0x13
    jc fail
    jmp main

fail:
    mov si, msg_fail
    call puts
    mov ax, 1
    mov dx, 0x501
    out dx, ax
    hlt

puts:
    push ax
    push dx
.l: lodsb
    test al, al
    jz .d
    mov dx, 0x3F8
    out dx, al
    jmp .l
.d: pop dx
    pop ax
    ret

msg_boot: db "MBR", 10, 0
msg_fail: db "FAIL", 10, 0
dap:      db 16, 0
dap_cnt:  dw 0
dap_buf:  dw 0, 0
dap_lba:  dq 0
times 510 - ($ - $$) db 0
dw 0xAA55

main:
    ; --- INT 13h extended read of LBA 4..11 (BIOS PIO, 8 sectors) ---
    mov dword [dap_lba], 4
    mov word [dap_buf], TEXT
    mov word [dap_cnt], 8
    mov ah, 0x42
    mov dl, 0x80
    mov si, dap
    int 0x13
    jc fail
    mov si, TEXT
    call puts
    mov si, TEXT + 7 * 512
    call puts
    ; --- run the old code at CODE ---
    mov si, stub_old
    mov di, CODE
    mov cx, stub_old_end - stub_old
    rep movsb
    mov bx, CODE
    call bx
    ; --- bus master base from BAR4 of 00:01.1 ---
    mov eax, 0x80000920
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    and ax, 0xFFFC
    mov bp, ax
    ; --- IRQ 14 handler (INT 76h), unmask IRQ 14 and the cascade, nIEN off ---
    mov word [0x76 * 4], irq14
    mov word [0x76 * 4 + 2], 0
    in al, 0xA1
    and al, 0xBF
    out 0xA1, al
    in al, 0x21
    and al, 0xFB
    out 0x21, al
    mov dx, 0x3F6
    mov al, 0x00
    out dx, al
    ; --- READ DMA: LBA 10 -> CODE, one PRD ---
    mov dword [PRD], CODE
    mov dword [PRD + 4], 0x80000000 | 512
    mov al, 0xC8
    mov ecx, 12
    call ata_dma
    mov bx, CODE
    call bx                      ; must print the new code's text
    ; --- WRITE DMA: WBUF -> LBA 20..21 from two PRDs, then INT 13h read back ---
    mov si, wtext
    mov di, WBUF
    mov cx, wtext_end - wtext
    rep movsb
    mov dword [PRD], WBUF
    mov dword [PRD + 4], 512
    mov dword [PRD + 8], WBUF + 512
    mov dword [PRD + 12], 0x80000000 | 512
    mov byte [WBUF + 512], 'B'
    mov byte [WBUF + 513], 0
    mov al, 0xCA
    mov ecx, 20
    call ata_dma
    ; nIEN again for the BIOS's polled PIO, as firmware runs it.  (Without it IRQ 14 arrives
    ; while the BIOS is in REP INSW; emu's vCPU then repeats one IN of the string.)
    mov dx, 0x3F6
    mov al, 0x02
    out dx, al
    mov dword [dap_lba], 20
    mov word [dap_buf], RBUF
    mov word [dap_cnt], 2
    mov ah, 0x42
    mov dl, 0x80
    mov si, dap
    int 0x13
    jc fail
    mov si, RBUF
    call puts
    mov si, RBUF + 512
    call puts
    mov si, msg_done
    call puts
    mov ax, 0
    mov dx, 0x501
    out dx, ax
    hlt

; AL = command, ECX = LBA (one or two sectors by the PRDs: count from PRD table)
ata_dma:
    push ax
    mov byte [FLAG], 0
    mov dx, bp
    mov al, 0
    out dx, al                   ; stop
    add dx, 2
    mov al, 0x06
    out dx, al                   ; clear INT/ERR
    add dx, 2
    mov eax, PRD
    out dx, eax
    mov dx, 0x1F6
    mov eax, ecx
    shr eax, 24
    or al, 0xE0
    out dx, al
    mov dx, 0x1F2
    mov al, 1
    cmp dword [PRD + 4], 512
    jne .one
    mov al, 2
.one:
    out dx, al
    mov eax, ecx
    mov dx, 0x1F3
    out dx, al
    shr eax, 8
    inc dx
    out dx, al
    shr eax, 8
    inc dx
    out dx, al
    pop ax
    mov dx, 0x1F7
    mov ah, al
    out dx, al                   ; command
    mov dx, bp
    mov al, 0x01
    cmp ah, 0xC8
    jne .dir
    mov al, 0x09                 ; to memory
.dir:
    out dx, al                   ; start
    sti
.wait:
    hlt
    cmp byte [FLAG], 0
    je .wait
    cli
    mov dx, bp
    add dx, 2
    in al, dx
    mov [bm_status], al
    mov dx, bp
    mov al, 0
    out dx, al                   ; stop
    mov si, msg_bm
    call puts
    mov al, [bm_status]
    call puthex
    mov si, msg_st
    call puts
    mov al, [ata_status]
    call puthex
    mov si, msg_crlf
    call puts
    ret

irq14:
    push ax
    push dx
    mov dx, 0x1F7
    in al, dx                    ; acknowledge the device
    mov [ata_status], al
    mov byte [FLAG], 1
    mov al, 0x20
    out 0xA0, al
    out 0x20, al
    pop dx
    pop ax
    iret

puthex:
    push ax
    shr al, 4
    call .nib
    pop ax
    and al, 0x0F
.nib:
    push dx
    add al, '0'
    cmp al, '9'
    jbe .p
    add al, 7
.p: mov dx, 0x3F8
    out dx, al
    pop dx
    ret

stub_old:                        ; position independent: prints OLD
    push dx
    push ax
    mov dx, 0x3F8
    mov al, 'O'
    out dx, al
    mov al, 'L'
    out dx, al
    mov al, 'D'
    out dx, al
    mov al, 10
    out dx, al
    pop ax
    pop dx
    ret
stub_old_end:

msg_done: db "DONE", 10, 0
msg_bm:   db "BM ", 0
msg_st:   db " ST ", 0
msg_crlf: db 10, 0
wtext:    db "A written by DMA", 10, 0
wtext_end:
bm_status: db 0
ata_status: db 0
times 2048 - ($ - $$) db 0
