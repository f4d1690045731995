; reset - what a misbehaving guest gets: the machine resets on a triple fault, on 0xFE to the
; keyboard controller (port 0x64) and on 0xCF9; reads from unassigned I/O ports return all
; ones; a flood of port writes changes nothing.  The guest counts its boots in CMOS RAM byte
; 0x7E (battery-backed, so it survives a reset; the firmware leaves it alone), printing one
; result line per stage, so the run shows the banner four times before PASS.

%include "boot.inc"

CMOS_STAGE      equ 0x7E
STAGE_MAGIC     equ 0xE0            ; stage n is stored as STAGE_MAGIC | n
UNASSIGNED_PORT equ 0x2F8           ; COM2: nothing there with -nodefaults -serial stdio
KBC_STATUS      equ 0x64
KBC_CMD         equ 0x64
KBC_RESET       equ 0xFE            ; pulse the CPU reset line
RCR_PORT        equ 0xCF9           ; PIIX3 reset control register
RCR_SYS_RST     equ 0x02
RCR_RST_CPU     equ 0x04

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/reset start"
        cli
        mov ecx, PIT_1KHZ
        call pit_start16                ; time base for the "no reset happened" timeouts
        mov al, CMOS_STAGE
        call cmos_read16
        mov ah, al
        and ah, 0xF0
        cmp ah, STAGE_MAGIC
        je .known
        xor al, al                      ; first boot: whatever the byte held
.known:
        and al, 0x0F
        cmp al, 1
        je stage1
        cmp al, 2
        je stage2
        cmp al, 3
        je stage3

stage0:
        mov ah, STAGE_MAGIC | 1
        call set_stage
        PUTLN "reset: triple fault now"
        lidt [null_idt]                 ; INT3 -> #GP -> #DF -> shutdown: none can be delivered
        int3
        FATAL "INT3 with an empty IVT returned (no triple fault)"

stage1:
        TEST "triple_fault"
        SHOWDEC "boot", 2
        ENDTEST
        mov ah, STAGE_MAGIC | 2
        call set_stage
        mov ecx, 100                    ; the i8042 input buffer must be empty first
.kbc_wait:
        in al, KBC_STATUS
        test al, 0x02
        jz .kbc_ready
        push ecx
        mov ecx, 1
        call pit_wait16
        pop ecx
        loop .kbc_wait
.kbc_ready:
        mov al, KBC_RESET
        out KBC_CMD, al
        mov ecx, 500
        call pit_wait16
        FATAL "no reset within 500 ms of writing 0xFE to port 0x64"

stage2:
        TEST "kbc_reset"
        SHOWDEC "boot", 3
        ENDTEST
        mov ah, STAGE_MAGIC | 3
        call set_stage
        mov dx, RCR_PORT
        mov al, RCR_SYS_RST
        out dx, al
        mov al, RCR_SYS_RST | RCR_RST_CPU
        out dx, al
        mov ecx, 500
        call pit_wait16
        FATAL "no reset within 500 ms of writing 0x06 to port 0xCF9"

stage3:
        TEST "cf9_reset"
        SHOWDEC "boot", 4
        ENDTEST
        mov ah, 0
        call set_stage

        ; Unassigned ports read as all ones at every width.
        mov dx, UNASSIGNED_PORT
        in al, dx
        movzx ebx, al
        in ax, dx
        movzx ecx, ax
        in eax, dx
        mov edi, eax
        TEST "unassigned_port"
        CHECK "byte", ebx, 0xFF
        CHECK "word", ecx, 0xFFFF
        CHECK "dword", edi, 0xFFFFFFFF
        ENDTEST

        ; A flood of writes to the POST port and the unassigned one: the guest keeps running
        ; and the unassigned port still reads all ones.
        mov ecx, 100000
.flood:
        mov al, cl
        out 0x80, al
        mov dx, UNASSIGNED_PORT
        out dx, al
        dec ecx
        jnz .flood
        mov dx, UNASSIGNED_PORT
        in al, dx
        movzx ebx, al
        TEST "port_flood"
        SHOWDEC "writes", 200000
        CHECK "still_unassigned", ebx, 0xFF
        ENDTEST
        FINISH

; set_stage: CMOS[CMOS_STAGE] = AH.
set_stage:
        mov al, CMOS_STAGE
        jmp cmos_write16

null_idt:
        dw 0
        dd 0

%include "print.inc"
%include "pc.inc"
%include "end.inc"
