; pic-pit - the 8259 pair and 8254 channel 0 in real mode, interrupts through the IVT.
;
; Remaps the PICs to 0x20/0x28, runs PIT channel 0 at 1 kHz (mode 2), takes exactly IRQ0_COUNT
; IRQ 0s (the handler masks the line itself on the last one, so none can slip in after), EOIs
; them alternately non-specific and specific, reads ISR/IRR through OCW3, checks a masked tick
; stays pending in IRR and is delivered on unmask, and times the tick rate against the RTC's
; seconds.

%include "boot.inc"

IRQ0_COUNT      equ 200
VEC_MASTER      equ 0x20
VEC_SLAVE       equ 0x28

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/pic-pit start"
        cli
        ; IVT: our IRQ 0 handler, and a recorder for every other PIC vector.
        mov word [VEC_MASTER * 4], irq0_handler
        mov word [VEC_MASTER * 4 + 2], 0
%assign v 1
%rep 15
        mov word [(VEC_MASTER + v) * 4], unexpected_ %+ v
        mov word [(VEC_MASTER + v) * 4 + 2], 0
%assign v v + 1
%endrep

        mov bx, (VEC_SLAVE << 8) | VEC_MASTER
        call pic_init16
        in al, PIC1_DATA
        movzx ebx, al
        in al, PIC2_DATA
        movzx ecx, al
        mov al, 0xFE
        out PIC1_DATA, al
        in al, PIC1_DATA
        movzx edi, al
        mov al, 0xFF
        out PIC1_DATA, al
        TEST "imr"
        CHECK "master", ebx, 0xFF
        CHECK "slave", ecx, 0xFF
        CHECK "master_fe", edi, 0xFE
        ENDTEST

        mov ecx, PIT_1KHZ
        call pit_start16
        ; Read-back command: status of channel 0 (OUT, access, mode, BCD), then its count.
        mov al, 0xE2                    ; read-back, latch status only, channel 0
        out PIT_MODE, al
        in al, PIT_CH0
        movzx ebx, al
        and ebx, 0x7F                   ; OUT (bit 7) depends on the instant
        call pit_read16
        mov ebp, eax
        mov ecx, 2
        call pit_wait16
        call pit_read16
        mov edi, eax
        TEST "pit"
        CHECK "status", ebx, 0x34       ; lobyte/hibyte, mode 2, binary
        SHOWDEC "count_a", ebp
        SHOWDEC "count_b", edi
        xor ebx, ebx                    ; mode 2 counts N..1, never 0 or above N
        cmp ebp, 1
        jb .range_done
        cmp ebp, PIT_1KHZ
        ja .range_done
        cmp edi, 1
        jb .range_done
        cmp edi, PIT_1KHZ
        ja .range_done
        inc ebx
.range_done:
        CHECK "counts_in_1_1193", ebx, 1
        ENDTEST

        ; Exactly IRQ0_COUNT interrupts.  The first one must come within 50 PIT periods.
        mov dword [irq0_limit], IRQ0_COUNT
        TEST "irq0"
        mov al, 0xFE
        out PIC1_DATA, al
        sti
        mov ecx, 50
        call pit_wait16
        cmp dword [irq0_count], 0
        jne .ticking
        cli
        FATAL "no IRQ 0 within 50 PIT periods of unmasking it"
.ticking:
        sti
        hlt                             ; sleeps until the next tick
        cmp dword [irq0_count], IRQ0_COUNT
        jb .ticking
        cli
        CHECK "count", dword [irq0_count], IRQ0_COUNT
        movzx eax, byte [isr_in_irq]
        CHECK "isr_in_handler", eax, 0x01
        mov al, OCW3_READ_ISR
        out PIC1_CMD, al
        in al, PIC1_CMD
        movzx ebx, al
        mov al, OCW3_READ_IRR
        out PIC1_CMD, al
        CHECK "isr_after_eoi", ebx, 0x00
        in al, PIC1_DATA
        movzx ebx, al
        CHECK "imr_masked_by_handler", ebx, 0xFF
        ENDTEST

        ; Masked: ticks must not be delivered, but IRQ 0 stays requested in IRR.
        sti
        mov ecx, 5
        call pit_wait16
        cli
        in al, PIC1_CMD                 ; OCW3 left IRR selected
        movzx ebx, al
        TEST "masked"
        CHECK "count", dword [irq0_count], IRQ0_COUNT
        CHECK "irr", ebx, 0x01
        ENDTEST

        ; Unmask: the pending request is delivered at once (the handler re-masks it).
        mov al, 0xFE
        out PIC1_DATA, al
        sti
        nop
        nop
        cli
        TEST "unmask"
        CHECK "count", dword [irq0_count], IRQ0_COUNT + 1
        ENDTEST

        ; Tick rate against the RTC: the handler samples the RTC seconds on every tick and
        ; notes the tick count at each change; the main loop sleeps in HLT meanwhile (polling
        ; the chips here would itself delay the emulator's timers).
        mov dword [irq0_limit], 0xFFFFFFFF
        mov al, RTC_SEC
        call cmos_read16
        mov [rate_last_sec], al
        mov byte [rate_sampling], 1
        mov ebx, [irq0_count]
        add ebx, 3000                   ; give up after 3 s of ticks
        mov al, 0xFE
        out PIC1_DATA, al
        TEST "rate"
.rate_wait:
        sti
        hlt
        cli
        cmp dword [rate_changes], 2
        jae .rate_measured
        cmp [irq0_count], ebx
        jb .rate_wait
        FATAL "the RTC seconds did not change twice within 3000 IRQ 0 ticks"
.rate_measured:
        mov byte [rate_sampling], 0
        mov al, 0xFF
        out PIC1_DATA, al
        mov ecx, [rate_tick_2]
        sub ecx, [rate_tick_1]
        SHOWDEC "irqs_per_rtc_second", ecx
        xor ebx, ebx                    ; loose: a busy host delays (and merges) ticks
        cmp ecx, 300
        jb .rate_done
        cmp ecx, 1600
        ja .rate_done
        inc ebx
.rate_done:
        CHECK "in_300_1600", ebx, 1
        ENDTEST

        TEST "spurious"
        CHECK "other_vectors", dword [unexpected_count], 0
        ENDTEST
        FINISH

irq0_handler:
        push eax
        inc dword [irq0_count]
        cmp dword [irq0_count], 1
        jne .counted
        mov al, OCW3_READ_ISR           ; our own level must be in service now
        out PIC1_CMD, al
        in al, PIC1_CMD
        mov [isr_in_irq], al
        mov al, OCW3_READ_IRR
        out PIC1_CMD, al
.counted:
        cmp byte [rate_sampling], 0
        je .limit
        mov al, RTC_SEC
        call cmos_read16
        cmp al, [rate_last_sec]
        je .limit
        mov [rate_last_sec], al
        inc dword [rate_changes]
        mov eax, [irq0_count]
        cmp dword [rate_changes], 1
        jne .second_change
        mov [rate_tick_1], eax
        jmp .limit
.second_change:
        cmp dword [rate_changes], 2
        jne .limit
        mov [rate_tick_2], eax
.limit:
        mov eax, [irq0_count]
        cmp eax, [irq0_limit]
        jb .eoi
        in al, PIC1_DATA                ; the last one: mask IRQ 0 before it can recur
        or al, 0x01
        out PIC1_DATA, al
.eoi:
        mov al, OCW2_EOI
        test byte [irq0_count], 1
        jz .send
        mov al, OCW2_SEOI | 0           ; odd ticks: specific EOI for level 0
.send:
        out PIC1_CMD, al
        pop eax
        iret

%assign v 1
%rep 15
unexpected_ %+ v:
        push ax
        mov byte [unexpected_vector], VEC_MASTER + v
        inc dword [unexpected_count]
        mov al, OCW2_EOI
 %if v >= 8
        out PIC2_CMD, al
 %endif
        out PIC1_CMD, al
        pop ax
        iret
%assign v v + 1
%endrep

        align 4
irq0_count:             dd 0
irq0_limit:             dd 0
unexpected_count:       dd 0
unexpected_vector:      db 0
rate_changes:           dd 0
rate_tick_1:            dd 0
rate_tick_2:            dd 0
rate_sampling:          db 0
rate_last_sec:          db 0
isr_in_irq:             db 0

%include "print.inc"
%include "pc.inc"
%include "end.inc"
