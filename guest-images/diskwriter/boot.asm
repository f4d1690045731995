; boot.asm - the diskwriter's MBR and its 32-bit entry glue (linked first by link.ld).
;
; The BIOS loads sector 0 to 0:7C00.  This code programs COM1 (115200 8N1), reads the payload -
; the sectors right after the MBR, their count computed by the linker - to 0:7E00 with INT 13h
; AH=42h (EDD; both SeaBIOS and firmware/bios.bin have it), checks the signature the linker puts
; at the payload's end, switches to flat 32-bit protected mode (no paging) and calls dw_main.
; The parameter block at offset 0x180 (see FORMAT.md, "Parameters") is read by the C code.
; Also here: the 48 interrupt entry stubs (exceptions 0-31, IRQs remapped to 0x20-0x2F) that
; call the C handlers with the vector number.

COM1            equ 0x3F8
DEBUG_EXIT_PORT equ 0x501
EXIT_DISK       equ 2               ; QEMU exit status 5: the payload could not be read
STACK_TOP       equ 0x90000

extern dw_main, dw_interrupt, _payload_sectors
global _start16, isr_table

        section .boot progbits alloc exec write
        bits 16
_start16:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7C00
        jmp 0:.flat                     ; some BIOSes enter at 07C0:0000
.flat:
        cld
        mov [boot_drive], dl
        mov dx, COM1 + 3
        mov al, 0x83                    ; DLAB, 8N1
        out dx, al
        mov dx, COM1
        mov al, 1                       ; divisor 1: 115200 baud
        out dx, al
        inc dx
        xor al, al
        out dx, al
        mov dx, COM1 + 3
        mov al, 0x03
        out dx, al
        mov dx, COM1 + 2
        mov al, 0x07                    ; FIFOs on and cleared
        out dx, al
        mov si, msg_boot
        call puts16
        sti                             ; the BIOS disk code may wait for its IRQ
        mov byte [tries], 3
.read:
        mov si, dap
        mov ah, 0x42
        mov dl, [boot_drive]
        int 0x13
        jnc .check
        mov [disk_status], ah
        dec byte [tries]
        jz .fail
        xor ax, ax                      ; AH=00h reset, then retry
        mov dl, [boot_drive]
        int 0x13
        jmp .read
.check:
        cli
        mov byte [disk_status], 0xEE    ; read "worked" but the signature is not there
        cmp dword [_payload_sig], 'DWEN'
        jne .fail
        cmp dword [_payload_sig + 4], 'D!!!'
        jne .fail
        in al, 0x92                     ; fast A20 (nothing above 1 MiB is used; harmless)
        or al, 2
        and al, 0xFE
        out 0x92, al
        lgdt [gdtr]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        jmp 0x08:pm32
.fail:
        mov si, msg_fail
        call puts16
        mov al, [disk_status]
        shr al, 4
        call hexdigit16
        mov al, [disk_status]
        call hexdigit16
        mov si, msg_crlf
        call puts16
        mov dx, DEBUG_EXIT_PORT
        mov al, EXIT_DISK
        out dx, al
.halt:
        hlt
        jmp .halt

hexdigit16:                             ; print the low nibble of AL
        and al, 0x0F
        add al, '0'
        cmp al, '9'
        jbe .digit
        add al, 'a' - '0' - 10
.digit:
        mov ah, al
        mov dx, COM1 + 5
.wait:
        in al, dx
        test al, 0x20
        jz .wait
        mov dx, COM1
        mov al, ah
        out dx, al
        ret

puts16:
        lodsb
        test al, al
        jz .done
        mov ah, al
        mov dx, COM1 + 5
.wait:
        in al, dx
        test al, 0x20
        jz .wait
        mov dx, COM1
        mov al, ah
        out dx, al
        jmp puts16
.done:
        ret

        bits 32
pm32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov fs, ax
        mov gs, ax
        mov esp, STACK_TOP
        push dword 0x7C00 + 0x180       ; the parameter block
        call dw_main
.halt:
        cli
        hlt
        jmp .halt

msg_boot:   db "diskwriter mbr: loading payload", 13, 10, 0
msg_fail:   db "FAIL disk read status=", 0
msg_crlf:   db 13, 10, 0
boot_drive: db 0
disk_status: db 0
tries:      db 0
        align 4
dap:        db 0x10, 0                  ; EDD disk address packet
            dw _payload_sectors
            dw 0x7E00, 0                ; offset, segment
            dq 1                        ; from LBA 1
        align 8
gdt:        dq 0
            dq 0x00CF9A000000FFFF       ; 0x08: flat 32-bit code
            dq 0x00CF92000000FFFF       ; 0x10: flat data
gdtr:       dw gdt.end - gdt - 1
            dd gdt
gdt.end     equ gdtr

        times 0x180 - ($ - $$) db 0
params:     db "DWPARAMS"               ; FORMAT.md "Parameters"; tests patch these
            dd 2048                     ; region_start: first LBA of the data area
            dd 256                      ; region_count: LBAs it cycles through (<= 4096)
            dd 100                      ; rate: writes per second per disk (0 = unpaced)
            dd 16                       ; flush_every: a flush after this many writes per disk
            dd 0                        ; ide_mode: 0 alternate PIO/DMA, 1 PIO, 2 DMA
            dd 0                        ; flags: bit 0 start paused, bit 1 no interrupts (poll)
        times 510 - ($ - $$) db 0
        dw 0xAA55

; Interrupt entry: every vector pushes a dummy error code where the CPU pushes none, then its
; number, and dw_interrupt(vector, error, eip) runs with all registers saved.
        section .text
%macro ISR 1
isr_%1:
%if %1 != 8 && (%1 < 10 || %1 > 14) && %1 != 17
        push dword 0
%endif
        push dword %1
        jmp isr_common
%endmacro
%assign v 0
%rep 48
        ISR v
%assign v v + 1
%endrep

isr_common:
        pushad
        cld
        push dword [esp + 40]           ; eip
        push dword [esp + 40]           ; error code
        push dword [esp + 40]           ; vector
        call dw_interrupt
        add esp, 12
        popad
        add esp, 8
        iretd

        section .rodata
        align 4
isr_table:
%assign v 0
%rep 48
        dd isr_ %+ v
%assign v v + 1
%endrep

; The payload's last 8 bytes (link.ld places this section last); the MBR checks them.
        section .sig progbits alloc noexec nowrite align=8
global _payload_sig
_payload_sig: db "DWEND!!!"
            dd 0                        ; checksum fixup, set by build: the payload's u32 words sum to 0
