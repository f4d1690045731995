; A 64 KiB BIOS image for the HMP ``info registers`` / ``x`` / ``xp`` comparison with QEMU
; (tests/unit/qmp/test_qmp_hmp_cpu_qemu.py).  From the reset vector it loads known values
; into every register ``info registers`` shows, then stops with CLI; HLT in the mode chosen
; at assembly time (nasm -D MODE=32 or -D MODE=64):
;   MODE=32: protected mode, paging on (virtual 0x400000 -> physical 0x20000), an LDT and
;            a busy 32-bit TSS loaded, x87 stack with 1.0 and pi, SSE on (XMM0, XMM7, MXCSR);
;   MODE=64: long mode (2 MiB pages, the same 0x400000 -> 0x20000 mapping through a 4 KiB
;            table), R8-R15 and XMM15 loaded.
; Physical 0x20000 holds the bytes "HMP-test" followed by 0x00..0x3f for the memory dumps.

%ifndef MODE
%define MODE 32
%endif

ROMBASE equ 0xF0000            ; the last 64 KiB below 1 MiB (and at 4 GiB - 64 KiB)
PD      equ 0x10000
PT      equ 0x11000
PT2     equ 0x12000
DATA    equ 0x20000
STACK   equ 0x9000

        bits 16
        org 0
start16:
        cli
        cld
        xor ax, ax
        mov ss, ax
        mov sp, STACK
        mov ax, 0x2000
        mov es, ax
        xor di, di                      ; es:di = physical DATA
        mov si, pattern
        mov ax, cs
        mov ds, ax
        mov cx, 8
        rep movsb                       ; "HMP-test"
        xor al, al
fill:   stosb
        inc al
        cmp al, 0x40
        jne fill
        fninit
        fld1
        fldpi
        o32 lgdt [cs:gdt_ptr]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        jmp dword 0x08:(ROMBASE + start32)

        bits 32
start32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov fs, ax
        mov ax, 0x18
        mov gs, ax                      ; a 16-bit data segment (DS16 in the dump)
        mov esp, STACK
        mov ax, 0x28
        lldt ax
        mov ax, 0x30
        ltr ax
        ; page tables: PD[0] -> PT (identity 0-4 MiB), PD[1] -> PT2 (0x400000 -> DATA)
        mov edi, PD
        xor eax, eax
        mov ecx, 3 * 1024
        rep stosd
        mov dword [PD], PT | 3
        mov dword [PD + 4], PT2 | 3
        mov edi, PT
        mov eax, 3
        mov ecx, 1024
.pt:    stosd
        add eax, 0x1000
        loop .pt
        mov dword [PT2], DATA | 3
%if MODE == 32
        mov eax, PD
        mov cr3, eax
        mov eax, cr4
        or eax, (1 << 9) | (1 << 10)    ; OSFXSR, OSXMMEXCPT
        mov cr4, eax
        mov eax, cr0
        or eax, 0x80000000
        and eax, ~(1 << 2)              ; EM off: SSE usable
        or eax, 1 << 1                  ; MP
        mov cr0, eax
        movdqu xmm0, [ROMBASE + xmmdata]
        movdqu xmm7, [ROMBASE + xmmdata + 16]
        ldmxcsr [ROMBASE + mxcsr_val]
        mov eax, 0x11223344
        mov ebx, 0x55667788
        mov ecx, 0x99aabbcc
        mov edx, 0xddeeff00
        mov esi, 0x12345678
        mov edi, 0x9abcdef0
        mov ebp, 0x0fedcba9
        push dword 0xcafef00d
        std                             ; DF shows in the flags
        stc
        cli
.halt:  hlt
        jmp .halt
%else
        ; long mode: PML4 at 0x13000 -> PDPT 0x14000 -> PD64 0x15000
        ;   PD64[0] = 2 MiB page at 0, PD64[2] -> PT64 0x16000 (0x400000 -> DATA)
        mov edi, 0x13000
        xor eax, eax
        mov ecx, 4 * 1024
        rep stosd
        mov dword [0x13000], 0x14000 | 3
        mov dword [0x14000], 0x15000 | 3
        mov dword [0x15000], 0x83
        mov dword [0x15000 + 16], 0x16000 | 3
        mov dword [0x16000], DATA | 3
        mov eax, 0x13000
        mov cr3, eax
        mov eax, cr4
        or eax, (1 << 5) | (1 << 9) | (1 << 10)     ; PAE, OSFXSR, OSXMMEXCPT
        mov cr4, eax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 1 << 8                  ; LME
        wrmsr
        mov eax, cr0
        or eax, 0x80000000
        and eax, ~(1 << 2)
        or eax, 1 << 1
        mov cr0, eax
        jmp 0x38:(ROMBASE + start64)

        bits 64
start64:
        mov ax, 0x10
        mov ds, ax
        mov ss, ax
        movdqu xmm15, [ROMBASE + xmmdata]
        movdqu xmm1, [ROMBASE + xmmdata + 16]
        mov rax, 0x1122334455667788
        mov rbx, 0x99aabbccddeeff00
        mov rcx, -2
        mov rdx, 0x0123456789abcdef
        mov rsi, 0xfedcba9876543210
        mov rdi, 0x1
        mov rbp, 0x2
        mov r8, 0x8888888888888888
        mov r9, 0x9
        mov r10, 0x1010101010101010
        mov r11, 0x11
        mov r12, 0x1212
        mov r13, 0x131313
        mov r14, 0x14141414
        mov r15, 0x1515151515
        mov rsp, STACK
        push qword 0x0badc0de
        cli
.halt:  hlt
        jmp .halt
%endif

        align 16
xmmdata:
        dq 0x0123456789abcdef, 0xfedcba9876543210
        dq 0x1111111122222222, 0x3333333344444444
mxcsr_val:
        dd 0x00001fa0                   ; round down, all exceptions masked
pattern:
        db "HMP-test"

        align 8
gdt:
        dq 0
        dq 0x00cf9b000000ffff           ; 0x08 code 32, flat
        dq 0x00cf93000000ffff           ; 0x10 data 32, flat
        dq 0x000093000000ffff           ; 0x18 data 16, 64 KiB
        dq 0
        ; 0x28 LDT at ROMBASE + ldt, limit 15
        dw 15, (ROMBASE + ldt - $$) & 0xffff
        db ((ROMBASE + ldt - $$) >> 16) & 0xff, 0x82, 0x00, ((ROMBASE + ldt - $$) >> 24) & 0xff
        ; 0x30 32-bit TSS at 0x8000, limit 0x67
        dw 0x67, 0x8000
        db 0x00, 0x89, 0x00, 0x00
        dq 0x00af9b000000ffff           ; 0x38 code 64
gdt_end:
gdt_ptr:
        dw gdt_end - gdt - 1
        dd ROMBASE + gdt
        align 8
ldt:
        dq 0
        dq 0x00cff3000000ffff           ; an LDT data descriptor (DPL 3), never loaded

        times 0xfff0 - ($ - $$) db 0xf4
        bits 16
reset:
        jmp 0xf000:start16
        times 0x10000 - ($ - $$) db 0xf4
