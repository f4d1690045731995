; A bare-metal guest that drives virtio-blk-pci at 00:02.0 through its modern interface as
; Linux's virtio_pci_modern does: BAR4 (64-bit memory) at 0xFE000000 with QEMU's layout
; (common 0x0000, ISR 0x1000, device 0x2000, notify 0x3000 with multiplier 4, all checked
; against the vendor capabilities), VERSION_1 + FLUSH negotiated, FEATURES_OK read back,
; queue 0 at 0x10000/0x11000/0x12000, then OUT sector 5, IN sector 5, each waited for in
; HLT and woken by INTx (the handler reads ISR through MMIO).  Runs in "unreal" mode: DS is
; a flat 4 GiB segment kept from a trip to protected mode.  Runs as -bios on emu and QEMU.
; Exit (isa-debug-exit at 0xF4): 0x10 success, 0x2N failure at step N.
bits 16
org 0
%define BASE  0x5F0          ; unused word (kept for symmetry with the legacy guest)
%define ISRS  0x5F2
%define IRQS  0x5F3
%define EXIT  0xF4
%define BAR   0xFE000000
%define COMMON BAR
%define ISR   BAR + 0x1000
%define DEVCFG BAR + 0x2000
%define NOTIFY BAR + 0x3000

start:
    jmp 0xF000:main

%macro FAIL 1
    mov al, 0x20 + %1
    out EXIT, al
    cli
    hlt
%endmacro

%macro CFGADDR 1
    mov eax, 0x80001000 + %1
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
%endmacro

; REQ n, type, sector, buffer linear address, data flags
%macro REQ 5
    mov dword [es:0x4000], %2
    mov dword [es:0x4004], 0
    mov dword [es:0x4008], %3
    mov dword [es:0x400C], 0
    mov byte [es:0x6000], 0xFF
    mov dword [es:0x0000], 0x14000
    mov dword [es:0x0004], 0
    mov dword [es:0x0008], 16
    mov dword [es:0x000C], 0x00010001
    mov dword [es:0x0010], %4
    mov dword [es:0x0014], 0
    mov dword [es:0x0018], 512
    mov dword [es:0x001C], 0x00020000 | %5
    mov dword [es:0x0020], 0x16000
    mov dword [es:0x0024], 0
    mov dword [es:0x0028], 1
    mov dword [es:0x002C], 0x00000002
    mov word [es:0x1004 + 2 * (%1 - 1)], 0
    mov word [es:0x1002], %1
    mov word [dword NOTIFY], 0             ; queue 0: notify_off 0
%%wait:
    cli
    cmp word [es:0x2002], %1
    je %%done
    sti
    hlt
    jmp %%wait
%%done:
    sti
    cmp byte [es:0x6000], 0
    je %%ok
    FAIL %1
%%ok:
%endmacro

; CAP type, expected offset: find the vendor capability of cfg_type and check bar 4 + offset
%macro CAP 2
    CFGADDR 0x34
    in al, dx
    movzx si, al
%%next:
    test si, si
    jnz %%look
    FAIL 0xD
%%look:
    mov eax, 0x80001000
    or ax, si
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx                 ; vndr, next, len, cfg_type
    cmp al, 9
    jne %%skip
    ror eax, 24
    cmp al, %1
    je %%found
%%skip:
    mov eax, 0x80001000
    or ax, si
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFD
    in al, dx
    movzx si, al
    jmp %%next
%%found:
    mov eax, 0x80001004
    or ax, si
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in al, dx                  ; bar
    cmp al, 4
    jne %%bad
    mov eax, 0x80001008
    or ax, si
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx                 ; offset
    cmp eax, %2
    je %%ok
%%bad:
    FAIL 0xE
%%ok:
%endmacro

main:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov dword [BASE], 0
    ; firmware's work: PIRQA-D -> IRQ 11, ELCR level 11, BAR4 at 0xFE000000, line 11, MEM+MASTER
    mov eax, 0x80000860
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    mov eax, 0x0B0B0B0B
    out dx, eax
    mov dx, 0x4D1
    in al, dx
    or al, 0x08
    out dx, al
    CFGADDR 0x20
    mov eax, BAR
    out dx, eax
    CFGADDR 0x24
    xor eax, eax
    out dx, eax
    CFGADDR 0x3C
    mov al, 11
    out dx, al
    CFGADDR 0x04
    in ax, dx
    or ax, 6
    out dx, ax
    mov word [(0x70 + 3) * 4], irq_handler
    mov word [(0x70 + 3) * 4 + 2], 0xF000
    CAP 1, 0x0000
    CAP 3, 0x1000
    CAP 4, 0x2000
    CAP 2, 0x3000
    ; protected-mode trip: flat DS (kept in real mode), and the local APIC's LINT0 = ExtINT
    o32 lgdt [cs:gdt_desc]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp 0x08:.pm
.pm:
    mov ax, 0x10
    mov ds, ax
    mov eax, cr0
    and al, 0xFE
    mov cr0, eax
    jmp 0xF000:.rm
.rm:
    mov eax, 1
    cpuid
    test edx, 1 << 9
    jz .no_apic
    mov ecx, 0x1B
    rdmsr
    test eax, 1 << 11
    jz .no_apic
    and eax, 0xFFFFF000
    mov esi, eax
    or dword [esi + 0xF0], 0x100
    mov dword [esi + 0x350], 0x8700
    mov dword [esi + 0x360], 0x8400
.no_apic:
    ; 8259 pair: master 0x08, slave 0x70, only IRQ2 and IRQ11 open
    mov al, 0x11
    out 0x20, al
    out 0xA0, al
    mov al, 0x08
    out 0x21, al
    mov al, 0x70
    out 0xA1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xA1, al
    mov al, 1
    out 0x21, al
    out 0xA1, al
    mov al, 0xFB
    out 0x21, al
    mov al, 0xF7
    out 0xA1, al
    ; virtio 1.x initialisation (§3.1.1)
    mov esi, COMMON
    mov byte [esi + 0x14], 0
    mov byte [esi + 0x14], 1
    mov byte [esi + 0x14], 3
    mov dword [esi + 0x00], 1
    mov eax, [esi + 0x04]
    test al, 1                          ; VERSION_1
    jnz .v1
    FAIL 0
.v1:
    mov dword [esi + 0x08], 1
    mov dword [esi + 0x0C], 1           ; VERSION_1
    mov dword [esi + 0x00], 0
    mov eax, [esi + 0x04]
    and eax, 1 << 9                     ; FLUSH, if offered
    mov dword [esi + 0x08], 0
    mov [esi + 0x0C], eax
    mov byte [esi + 0x14], 0x0B
    test byte [esi + 0x14], 0x08
    jnz .fok
    FAIL 4
.fok:
    mov eax, [dword DEVCFG]             ; capacity, low half
    cmp eax, 2048
    je .cap_ok
    FAIL 5
.cap_ok:
    mov word [esi + 0x16], 0
    cmp word [esi + 0x18], 256
    je .qs_ok
    FAIL 6
.qs_ok:
    mov ax, 0x1000
    mov es, ax
    xor di, di
    xor eax, eax
    mov cx, 0x3000 / 4
    cld
    rep stosd
    mov dword [esi + 0x20], 0x10000
    mov dword [esi + 0x24], 0
    mov dword [esi + 0x28], 0x11000
    mov dword [esi + 0x2C], 0
    mov dword [esi + 0x30], 0x12000
    mov dword [esi + 0x34], 0
    mov word [esi + 0x1C], 1
    mov byte [esi + 0x14], 0x0F
    sti
    mov di, 0x5000
    mov al, 0x3C
    mov cx, 512
    rep stosb
    REQ 1, 1, 5, 0x15000, 1
    REQ 2, 0, 5, 0x17000, 3
    mov di, 0x7000
    mov al, 0x3C
    mov cx, 512
    repe scasb
    je .cmp_ok
    FAIL 8
.cmp_ok:
    cmp byte [IRQS], 1
    jae .irqs
    FAIL 11
.irqs:
    test byte [ISRS], 1
    jnz .isr
    FAIL 12
.isr:
    mov al, 0x10
    out EXIT, al
    cli
    hlt

    align 8
gdt:
    dq 0
    dq 0x00009B0F0000FFFF
    dq 0x008F93000000FFFF
gdt_desc:
    dw 3 * 8 - 1
    dd 0xF0000 + gdt

irq_handler:
    push ax
    mov al, [dword ISR]        ; read clears ISR and lowers INTx
    or [ISRS], al
    inc byte [IRQS]
    mov al, 0x20
    out 0xA0, al
    out 0x20, al
    pop ax
    iret

    times 0xFFF0 - ($ - $$) db 0xF4
reset_vector:
    jmp start
    times 0x10000 - ($ - $$) db 0xF4
