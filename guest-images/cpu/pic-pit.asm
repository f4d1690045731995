; pic-pit - the 8259 pair and 8254 channel 0 in real mode, interrupts through the IVT.
;
; Remaps the PICs to 0x20/0x28, runs PIT channel 0 at 1 kHz (mode 2), takes exactly IRQ0_COUNT
; IRQ 0s (the handler masks the line itself on the last one, so none can slip in after), EOIs
; them alternately non-specific and specific, reads ISR/IRR through OCW3, checks a masked tick
; stays pending in IRR and is delivered on unmask, times the tick rate against the RTC's
; seconds, and runs channel 2 as a one-shot through port 0x61 (gate, OUT2) as Linux does.

%include "boot.inc"

IRQ0_COUNT      equ 200
PIT_CH2         equ 0x42
PORT_B          equ 0x61            ; bit 0 gate 2, bit 1 speaker, bit 5 OUT2 (read)
PORTB_GATE2     equ 0x01
PORTB_OUT2      equ 0x20
CH2_COUNT       equ 11932           ; 10 ms
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

        ; Masked: ticks must not be delivered, but IRQ 0 stays requested in IRR.  Wait (with
        ; IF=1) until IRR shows it - the emulator's timer may run late on a busy host - and
        ; a few periods more.
        sti
        mov ebp, 1000
.irr_wait:
        mov ecx, 1
        call pit_wait16
        in al, PIC1_CMD                 ; OCW3 left IRR selected
        test al, 0x01
        jnz .irr_set
        dec ebp
        jnz .irr_wait
.irr_set:
        mov ecx, 3
        call pit_wait16
        cli
        in al, PIC1_CMD
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
        mov eax, [rate_tsc_2]           ; TSC ticks per RTC second / 1000
        mov edx, [rate_tsc_2 + 4]
        sub eax, [rate_tsc_1]
        sbb edx, [rate_tsc_1 + 4]
        mov ecx, 1000
        div ecx
        mov [tsc_per_ms], eax
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

        ; Channel 2 one-shot (mode 0) gated through port 0x61, as Linux calibrates the TSC:
        ; OUT2 (port 0x61 bit 5) low after programming, high ~10 ms later; then the read-back
        ; status says OUT=1, lobyte/hibyte, mode 0, and the count has wrapped past zero.
        in al, PORT_B
        and al, 0xFC
        or al, PORTB_GATE2              ; gate high, speaker off
        out PORT_B, al
        mov al, 0xB0                    ; channel 2, lobyte/hibyte, mode 0, binary
        out PIT_MODE, al
        mov al, CH2_COUNT & 0xFF
        out PIT_CH2, al
        mov al, CH2_COUNT >> 8
        out PIT_CH2, al
        in al, PORT_B
        movzx ebx, al
        and ebx, PORTB_OUT2             ; EBX = OUT2 right after programming
        rdtsc                           ; time it with the TSC: polling the PIT misses
        mov [ch2_tsc], eax              ; periods whenever the host deschedules the vCPU
        mov [ch2_tsc + 4], edx
        mov ebp, 50000000               ; bounded poll
.ch2_wait:
        in al, PORT_B
        test al, PORTB_OUT2
        jnz .ch2_done
        dec ebp
        jnz .ch2_wait
.ch2_done:
        rdtsc
        sub eax, [ch2_tsc]
        sbb edx, [ch2_tsc + 4]
        mov ecx, [tsc_per_ms]
        cmp edx, ecx                    ; quotient would not fit: report a huge value
        jae .ch2_slow
        div ecx
        mov ebp, eax                    ; EBP = ms until OUT2 rose
        jmp .ch2_timed
.ch2_slow:
        mov ebp, 0xFFFFFFFF
.ch2_timed:
        in al, PORT_B
        movzx ecx, al
        and ecx, PORTB_OUT2
        mov al, 0xE8                    ; read-back: latch status of channel 2
        out PIT_MODE, al
        in al, PIT_CH2
        movzx edi, al
        mov al, 0x80                    ; counter latch, channel 2
        out PIT_MODE, al
        in al, PIT_CH2
        mov dl, al
        in al, PIT_CH2
        mov dh, al
        movzx esi, dx
        mov [ch2_count], esi
        in al, PORT_B
        and al, 0xFC                    ; gate off again
        out PORT_B, al
        TEST "pit_ch2"
        CHECK "out2_start", ebx, 0
        CHECK "out2_end", ecx, PORTB_OUT2
        CHECK "status", edi, 0xB0
        SHOWDEC "ms_to_out2", ebp
        xor ebx, ebx                    ; 10 ms programmed; late if the vCPU was descheduled
        cmp ebp, 8
        jb .ch2_range
        cmp ebp, 250
        ja .ch2_range
        inc ebx
.ch2_range:
        CHECK "in_8_250", ebx, 1
        mov eax, [ch2_count]
        xor ebx, ebx
        cmp eax, CH2_COUNT
        jbe .ch2_wrap
        inc ebx
.ch2_wrap:
        CHECK "count_wrapped", ebx, 1
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
        push edx
        rdtsc                           ; host-time base for the channel 2 check
        cmp dword [rate_changes], 1
        jne .second_change
        mov [rate_tsc_1], eax
        mov [rate_tsc_1 + 4], edx
        mov eax, [irq0_count]
        mov [rate_tick_1], eax
        pop edx
        jmp .limit
.second_change:
        cmp dword [rate_changes], 2
        jne .tsc_done
        mov [rate_tsc_2], eax
        mov [rate_tsc_2 + 4], edx
        mov eax, [irq0_count]
        mov [rate_tick_2], eax
.tsc_done:
        pop edx
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
ch2_count:              dd 0
rate_tsc_1:             dq 0
rate_tsc_2:             dq 0
tsc_per_ms:             dd 0
ch2_tsc:                dq 0
rate_changes:           dd 0
rate_tick_1:            dd 0
rate_tick_2:            dd 0
rate_sampling:          db 0
rate_last_sec:          db 0
isr_in_irq:             db 0

%include "print.inc"
%include "pc.inc"
%include "end.inc"
