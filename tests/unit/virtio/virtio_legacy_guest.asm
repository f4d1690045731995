; A bare-metal guest that drives virtio-blk-pci at 00:02.0 through its legacy I/O BAR the
; way Linux's virtio_pci_legacy does: reset, ACKNOWLEDGE|DRIVER, features (FLUSH only),
; queue 0 at PFN 0x10, DRIVER_OK; then waits for each completion in HLT, woken by the INTx
; interrupt (8259, vector from the PCI interrupt line), whose handler reads ISR.
;   1. OUT sector 5 <- 512 x 0xC3           2. IN sector 5 -> compare
;   3. run a stub at 0:8000 (returns AL=1), IN sector 6 over it, run it again: AL must be 2
;      (the DMA must drop the translated code)
; Exit (isa-debug-exit at 0xF4): 0x10 success, 0x2N failure at step N.
; It does the firmware's PCI set-up itself, so it runs as -bios on emu and on QEMU alike.
bits 16
org 0
%define BASE  0x5F0          ; saved I/O base
%define ISRS  0x5F2          ; ISR bits seen by the handler
%define IRQS  0x5F3          ; interrupts taken
%define EXIT  0xF4

start:
    jmp 0xF000:main          ; run from the BIOS alias below 1 MiB

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
    mov dword [es:0x000C], 0x00010001     ; flags NEXT, next 1
    mov dword [es:0x0010], %4
    mov dword [es:0x0014], 0
    mov dword [es:0x0018], 512
    mov dword [es:0x001C], 0x00020000 | %5 ; next 2
    mov dword [es:0x0020], 0x16000
    mov dword [es:0x0024], 0
    mov dword [es:0x0028], 1
    mov dword [es:0x002C], 0x00000002     ; WRITE, last
    mov word [es:0x1004 + 2 * (%1 - 1)], 0
    mov word [es:0x1002], %1
    mov dx, [BASE]
    add dx, 16
    xor ax, ax
    out dx, ax                             ; QUEUE_NOTIFY 0
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

main:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov dword [BASE], 0
    ; firmware's work (no BIOS runs before us): PIIX3 (00:01.0) PIRQA-D all -> IRQ 11 (so the
    ; slot swizzle does not matter), ELCR level for 11, BAR0 at 0xC000, interrupt line 11
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
    CFGADDR 0x10
    mov eax, 0xC000
    out dx, eax
    CFGADDR 0x3C
    mov al, 11
    out dx, al
    ; PCI: BAR0, interrupt line, I/O + bus master on
    CFGADDR 0x10
    in eax, dx
    and ax, 0xFFFC
    mov [BASE], ax
    CFGADDR 0x3C
    in al, dx
    movzx bx, al
    sub bx, 8
    add bx, 0x70              ; slave PIC vectors 0x70-0x77
    shl bx, 2
    mov word [bx], irq_handler
    mov word [bx + 2], 0xF000
    CFGADDR 0x04
    in ax, dx
    or ax, 5
    out dx, ax
    ; local APIC (if any): LINT0 = ExtINT so the 8259 reaches the CPU (QEMU leaves LINT0
    ; masked for firmware to program, as SeaBIOS does); its registers are above 1 MiB, so
    ; go through 16-bit protected mode with a flat data segment
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
    o32 lgdt [cs:gdt_desc]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp 0x08:.pm
.pm:
    mov ax, 0x10
    mov ds, ax
    or dword [esi + 0xF0], 0x100        ; SVR: software enable
    mov dword [esi + 0x350], 0x8700     ; LINT0: ExtINT
    mov dword [esi + 0x360], 0x8400     ; LINT1: NMI
    mov eax, cr0
    and al, 0xFE
    mov cr0, eax
    jmp 0xF000:.rm
.rm:
    xor ax, ax
    mov ds, ax
.no_apic:
    ; 8259 pair: master 0x08, slave 0x70, only IRQ2 (cascade) and IRQ10/11 open
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
    mov al, 0xF3
    out 0xA1, al
    ; virtio: reset, ACKNOWLEDGE, DRIVER
    mov bp, [BASE]
    lea dx, [bp + 18]
    xor al, al
    out dx, al
    mov al, 1
    out dx, al
    mov al, 3
    out dx, al
    mov dx, bp
    in eax, dx                ; HOST_FEATURES
    and eax, 1 << 9           ; FLUSH
    lea dx, [bp + 4]
    out dx, eax
    lea dx, [bp + 14]
    xor ax, ax
    out dx, ax                ; QUEUE_SEL 0
    lea dx, [bp + 12]
    in ax, dx
    cmp ax, 256
    je .qok
    FAIL 0
.qok:
    mov ax, 0x1000
    mov es, ax
    xor di, di
    xor eax, eax
    mov cx, 0x3000 / 4
    cld
    rep stosd                 ; rings at 0x10000-0x12FFF zeroed
    lea dx, [bp + 8]
    mov eax, 0x10
    out dx, eax               ; QUEUE_PFN
    lea dx, [bp + 18]
    mov al, 7
    out dx, al                ; DRIVER_OK
    sti
    ; 1. write
    mov di, 0x5000
    mov al, 0xC3
    mov cx, 512
    rep stosb
    REQ 1, 1, 5, 0x15000, 1
    ; 2. read back
    REQ 2, 0, 5, 0x17000, 3
    mov di, 0x7000
    mov al, 0xC3
    mov cx, 512
    repe scasb
    je .cmp_ok
    FAIL 8
.cmp_ok:
    ; 3. code overwritten by DMA
    mov dword [0x8000], 0x00CB01B0   ; mov al,1 ; retf
    xor al, al
    call 0x0000:0x8000
    cmp al, 1
    je .stub1
    FAIL 9
.stub1:
    REQ 3, 0, 6, 0x8000, 3
    xor al, al
    call 0x0000:0x8000
    cmp al, 2
    je .stub2
    FAIL 10
.stub2:
    cmp byte [IRQS], 1         ; completions may share one interrupt (level-triggered, ISR read once)
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
    dq 0x00009B0F0000FFFF                ; 0x08: 16-bit code, base 0xF0000, limit 64 KiB
    dq 0x008F93000000FFFF                ; 0x10: data, base 0, limit 4 GiB
gdt_desc:
    dw 3 * 8 - 1
    dd 0xF0000 + gdt

irq_handler:
    push ax
    push dx
    mov dx, [BASE]
    add dx, 19
    in al, dx                 ; ISR: read clears it and lowers INTx
    or [ISRS], al
    inc byte [IRQS]
    mov al, 0x20
    out 0xA0, al
    out 0x20, al
    pop dx
    pop ax
    iret

    times 0xFFF0 - ($ - $$) db 0xF4
reset_vector:
    jmp start
    times 0x10000 - ($ - $$) db 0xF4
