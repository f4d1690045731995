; Interrupt behaviour probe: PIT/PIC/UART/RTC/i8042 interrupts delivered through the IVT, each
; recorded in a log (section letter, vector, what the handler read), printed in hex on COM1.
bits 16
org 0
%define LOG 0x800          ; word index at 0x7FE, bytes from 0x800
%macro OUTB 2
    mov dx, %1
    mov al, %2
    out dx, al
%endmacro
%macro PUTS 1
    jmp %%after
%%s: db %1, 0
%%after:
    mov si, %%s
    call puts
%endmacro
%macro REC 0               ; append AL to the log
    push bx
    mov bx, [0x7FE]
    mov [LOG + bx], al
    inc word [0x7FE]
    pop bx
%endmacro

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    ; IVT 0x20-0x2F -> stubs that record the vector
%assign v 0
%rep 16
    mov word [(0x20 + v) * 4], stub %+ v
    mov word [(0x20 + v) * 4 + 2], 0xF000
%assign v v + 1
%endrep
    mov word [0x7FE], 0
    mov byte [0x7FB], 0xFF
    mov byte [0x7FD], 0
    ; QEMU 7.2's local APIC leaves reset with LINT0 masked, so the 8259's INTR reaches the CPU
    ; only once firmware sets LINT0 to ExtINT (virtual wire), as SeaBIOS does.  Do the same
    ; from unreal mode; on a machine without a LAPIC the writes go nowhere.
    o32 lgdt [cs:gdtr]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp short .pm
.pm:
    mov bx, 0x08
    mov fs, bx
    and al, 0xFE
    mov cr0, eax
    jmp short .rm
.rm:
    xor bx, bx
    mov fs, bx
    mov eax, [fs:dword 0xFEE000F0]
    or eax, 0x1FF
    mov [fs:dword 0xFEE000F0], eax
    mov dword [fs:dword 0xFEE00350], 0x700
    call pic_init
    ; ---------- A: PIT mode 2 ~1 ms, three IRQ 0s with normal EOI (the handler masks after 3)
    mov al, 'A'
    REC
    mov byte [0x7FC], 0
    mov byte [0x7FB], 3
    OUTB 0x21, 0xFE
    OUTB 0x43, 0x34
    OUTB 0x40, 0xA9
    OUTB 0x40, 0x04
    sti
.a: hlt
    cmp byte [0x7FC], 3
    jb .a
    cli
    OUTB 0x21, 0xFF
    OUTB 0x43, 0x30          ; stop: mode 0, no count
    ; ---------- B: auto-EOI, ISR stays clear
    mov al, 'B'
    REC
    mov byte [0x7FD], 1      ; stubs skip EOI
    call pic_init_aeoi
    mov byte [0x7FC], 0
    mov byte [0x7FB], 2
    OUTB 0x21, 0xFE
    OUTB 0x43, 0x34
    OUTB 0x40, 0xA9
    OUTB 0x40, 0x04
    sti
.b: hlt
    cmp byte [0x7FC], 2
    jb .b
    cli
    OUTB 0x21, 0xFF
    OUTB 0x43, 0x30          ; stop: otherwise a tick while pic_init's ICW1 unmasks IRQ 0 shows in C
    OUTB 0x20, 0x0B
    in al, 0x20
    REC
    mov byte [0x7FD], 0
    mov byte [0x7FB], 0xFF
    call pic_init
    ; ---------- C: PIT mode 4 one-shot: exactly one IRQ 0
    mov al, 'C'
    REC
    OUTB 0x43, 0x38
    OUTB 0x40, 0x00
    OUTB 0x40, 0x08          ; 2048 ticks
    mov byte [0x7FC], 0
    OUTB 0x21, 0xFE
    sti
    mov al, 1
    call wait_count          ; the one-shot fires (however late the host's timer thread is)
    call delay_10ms          ; ... and only once
    cli
    OUTB 0x21, 0xFF
    ; ---------- D: UART THRE interrupt on IER enable, and after a transmitted byte
    mov al, 'D'
    REC
    OUTB 0x3FC, 0x08         ; OUT2
    OUTB 0x21, 0xEF          ; IRQ 4 only
    mov byte [0x7FC], 0
    sti
    OUTB 0x3F9, 0x02
    mov al, 1
    call wait_count
    OUTB 0x3F8, '.'
    mov al, 2
    call wait_count
    call delay_ms
    OUTB 0x3F9, 0x00
    cli
    ; ---------- E: RTC periodic 1024 Hz on IRQ 8, register C read in the handler (masked after 3)
    mov al, 'E'
    REC
    mov byte [0x7FC], 0
    mov byte [0x7FB], 3
    OUTB 0x21, 0xFB
    OUTB 0xA1, 0xFE
    OUTB 0x70, 0x0A
    OUTB 0x71, 0x26
    OUTB 0x70, 0x0B
    OUTB 0x71, 0x42
    sti
.e: hlt
    cmp byte [0x7FC], 3
    jb .e
    cli
    mov byte [0x7FB], 0xFF
    OUTB 0x70, 0x0B
    OUTB 0x71, 0x02
    OUTB 0x70, 0x0C
    in al, 0x71
    OUTB 0xA1, 0xFF
    ; ---------- F: keyboard identify -> three IRQ 1s, data read in the handler
    mov al, 'F'
    REC
    OUTB 0x21, 0xFD
    mov byte [0x7FC], 0
    sti
    OUTB 0x60, 0xF2
    mov al, 3
    call wait_count          ; FA AB 83, one IRQ each
    OUTB 0x64, 0xD2          ; a byte "from the keyboard"
    OUTB 0x60, 0x1C
    mov al, 4
    call wait_count
    call delay_ms
    cli
    OUTB 0x21, 0xFF
    ; ---------- G: masked edge stays in IRR; delivered on unmask
    mov al, 'G'
    REC
    OUTB 0x43, 0x38
    OUTB 0x40, 0x00
    OUTB 0x40, 0x01          ; 256 ticks; the host's timer thread may lag: wait for the edge
    call wait_irr0
    OUTB 0x20, 0x0A
    in al, 0x20
    and al, 0x01
    REC
    OUTB 0x21, 0xFE
    sti
    nop
    nop
    cli
    OUTB 0x21, 0xFF
    ; ---------- H: poll command
    mov al, 'H'
    REC
    OUTB 0x43, 0x38
    OUTB 0x40, 0x00
    OUTB 0x40, 0x01
    call wait_irr0
    OUTB 0x21, 0xFE
    OUTB 0x20, 0x0C
    in al, 0x20
    REC
    OUTB 0x20, 0x0B
    in al, 0x20
    REC
    OUTB 0x20, 0x20
    OUTB 0x20, 0x0C
    in al, 0x20
    REC
    OUTB 0x21, 0xFF
    ; ---------- print the log
    mov cx, [0x7FE]
    mov si, LOG
.p: mov al, [si]
    inc si
    call hex8
    loop .p
    mov al, 10
    call putc
    OUTB 0x501, 0
.hang:
    hlt
    jmp .hang

; record vector, do the device's acknowledge, EOI
%assign v 0
%rep 16
stub %+ v:
    push ax
    push dx
    mov al, 0x20 + v
    REC
  %if v == 4
    mov dx, 0x3FA
    in al, dx
    REC
  %elif v == 8
    mov al, 0x0C
    out 0x70, al
    in al, 0x71
    and al, 0xEF            ; UF: set whenever a second ticks by, which is up to timing
    REC
  %elif v == 1
    in al, 0x60
    REC
  %endif
    inc byte [0x7FC]
    mov al, [0x7FC]
    cmp al, [0x7FB]
    jb .under
    mov al, 0xFF             ; limit reached: no further deliveries in this section
    out 0x21, al
    out 0xA1, al
.under:
    cmp byte [0x7FD], 0
    jne .noeoi
  %if v >= 8
    mov al, 0x20
    out 0xA0, al
  %endif
    mov al, 0x20
    out 0x20, al
.noeoi:
    pop dx
    pop ax
    iret
%assign v v + 1
%endrep

align 8
gdt:
    dq 0
    dq 0x00CF92000000FFFF       ; flat 4 GiB data
gdtr:
    dw 15
    dd 0xF0000 + gdt

pic_init:
    mov ah, 0x01
    jmp pic_init_common
pic_init_aeoi:
    mov ah, 0x03
pic_init_common:
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, ah
    out 0x21, al
    mov al, 0x11
    out 0xA0, al
    mov al, 0x28
    out 0xA1, al
    mov al, 0x02
    out 0xA1, al
    mov al, 0x01
    out 0xA1, al
    mov al, 0xFF
    out 0x21, al
    out 0xA1, al
    ret

; wait (at most ~2 s) until the handlers have counted AL deliveries in [0x7FC]
wait_count:
    push cx
    mov cx, 2000
.w: cmp [0x7FC], al
    jae .done
    push ax
    call delay_ms
    pop ax
    loop .w
.done:
    pop cx
    ret

; wait (at most ~2 s) until the master's IRR shows IRQ 0 (OCW3 read IRR: no side effects)
wait_irr0:
    push cx
    mov cx, 2000
    mov al, 0x0A
    out 0x20, al
.w: in al, 0x20
    test al, 0x01
    jnz .done
    call delay_ms
    loop .w
.done:
    pop cx
    ret

delay_10ms:
    push cx
    mov cx, 10
.l: call delay_ms
    loop .l
    pop cx
    ret

; ~1 ms busy wait on PIT channel 2 (mode 0, polled OUT2 on port 0x61)
delay_ms:
    push ax
    in al, 0x61
    and al, 0xFC
    or al, 0x01
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
    pop ax
    ret
%include "hw_rom_io.inc"
