; unassigned - what a guest reads where nothing is: memory in the PCI hole and above the end of
; RAM reads 0 on QEMU 7.2 at every width and ignores writes (no exception); the first and last
; bytes of RAM read back what was written.  32-bit protected mode, flat, no paging.  (Unassigned
; I/O ports read all ones instead; reset.img checks those.)

%include "boot.inc"

SEL_CODE0       equ 0x08
SEL_DATA0       equ 0x10
UNASSIGNED_HOLE equ 0xE0000000      ; PCI hole: no BAR is placed there
UNASSIGNED_HIGH equ 0x08000000      ; 128 MiB, above the machine's 64 MiB
RAM_LAST        equ 0x03FFFFFC      ; last dword of 64 MiB (with A20 off it aliases to RAM too)

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/unassigned start"
        cli
        lgdt [gdt_desc]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        jmp SEL_CODE0:pm_entry

        USE_BITS 32
pm_entry:
        mov ax, SEL_DATA0
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, 0x28000
        mov esi, UNASSIGNED_HOLE
        call probe
        TEST "pci_hole"
        call check_probe
        ENDTEST
        mov esi, UNASSIGNED_HIGH
        call probe
        TEST "above_ram"
        call check_probe
        ENDTEST

        mov dword [RAM_LAST], 0x5AA5C33C
        mov ebx, [RAM_LAST]
        TEST "ram_end"
        CHECK "last_dword", ebx, 0x5AA5C33C
        ENDTEST
        FINISH

; probe: ESI = address; reads dword/word/byte, writes a pattern, reads the dword again.
probe:
        mov eax, [esi]
        mov [p_dword], eax
        movzx eax, word [esi + 2]
        mov [p_word], eax
        movzx eax, byte [esi + 1]
        mov [p_byte], eax
        mov dword [esi], 0x12345678
        mov eax, [esi]
        mov [p_after], eax
        ret

check_probe:
        CHECK "dword", dword [p_dword], 0
        CHECK "word", dword [p_word], 0
        CHECK "byte", dword [p_byte], 0
        CHECK "after_write", dword [p_after], 0
        ret

        align 8
gdt:
        dq 0
        dq 0x00CF9A000000FFFF
        dq 0x00CF92000000FFFF
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd gdt
        align 4
p_dword:        dd 0
p_word:         dd 0
p_byte:         dd 0
p_after:        dd 0

        USE_BITS 16
%include "print.inc"
        USE_BITS 32
%include "print.inc"
%include "end.inc"
