; rtc - the MC146818 RTC/CMOS in real mode: status registers as the firmware leaves them, the
; time read right after an update cycle (UIP falling edge) in BCD, binary and 12-hour modes,
; the seconds advancing one per update, and the update-ended interrupt (UIE) on IRQ 8 through
; the slave PIC, counted twice, each acknowledged by reading register C, their spacing timed
; by the TSC (calibrated on two update cycles).  Every wait is bounded by PIT time (IRQ 0 at
; 1 kHz or polled), so a dead RTC gives FAIL, not a hang.

%include "boot.inc"

VEC_MASTER      equ 0x20
VEC_SLAVE       equ 0x28
UIE_COUNT       equ 2

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/rtc start"
        cli
        mov word [(VEC_SLAVE + 0) * 4], irq8_handler
        mov word [(VEC_SLAVE + 0) * 4 + 2], 0
%assign v 0
%rep 16
 %if v != 8
        mov word [(VEC_MASTER + v) * 4], unexpected_ %+ v
        mov word [(VEC_MASTER + v) * 4 + 2], 0
 %endif
%assign v v + 1
%endrep
        mov bx, (VEC_SLAVE << 8) | VEC_MASTER
        call pic_init16
        mov ecx, PIT_1KHZ
        call pit_start16

        ; Status registers as SeaBIOS leaves them: 32.768 kHz divider + 1024 Hz rate (A=26),
        ; 24-hour BCD with every interrupt off (B=02), valid RAM and time (D=80).
        mov al, RTC_REG_A
        call cmos_read16
        movzx ebx, al
        and ebx, 0x7F                   ; UIP depends on the instant
        mov al, RTC_REG_B
        call cmos_read16
        movzx ecx, al
        mov al, RTC_REG_D
        call cmos_read16
        movzx edi, al
        TEST "status"
        CHECK "reg_a", ebx, 0x26
        CHECK "reg_b", ecx, RTC_B_24H
        CHECK "reg_d", edi, 0x80
        ENDTEST

        ; One consistent reading in each mode, right after an update cycle.
        call wait_uip_fall
        rdtsc                           ; TSC at this update and the next: ticks per second
        mov [tsc_update_1], eax
        mov [tsc_update_1 + 4], edx
        mov di, time_bcd
        call read_time
        mov ax, ((RTC_B_24H | RTC_B_DM) << 8) | RTC_REG_B
        call cmos_write16
        mov di, time_bin
        call read_time
        mov ax, (RTC_B_DM << 8) | RTC_REG_B      ; binary, 12-hour
        call cmos_write16
        mov al, RTC_HOUR
        call cmos_read16
        mov [hour12], al
        mov ax, (RTC_B_24H << 8) | RTC_REG_B
        call cmos_write16

        PUTS "rtc-time: 20"             ; the test compares this with the host's UTC clock
        mov si, time_print_order
        mov cx, 6
.print:
        lodsb
        movzx bx, al
        mov al, [time_bcd + bx]
        call puthexb16
        mov al, [si + 5]                ; separator
        call putc16
        loop .print
        call crlf16

        ; BCD digits valid and in range; binary = BCD converted.
        TEST "bcd"
        xor ebp, ebp                    ; bit i set: field i malformed or out of range
        xor bx, bx
.validate:
        mov al, [time_bcd + bx]
        mov ah, al
        and ah, 0x0F
        cmp ah, 9
        ja .bad_field
        mov ah, al
        shr ah, 4
        cmp ah, 9
        ja .bad_field
        call bcd_to_bin
        cmp al, [field_min + bx]
        jb .bad_field
        cmp al, [field_max + bx]
        ja .bad_field
        cmp al, [time_bin + bx]
        jne .bad_field
        jmp .next_field
.bad_field:
        bts ebp, ebx
.next_field:
        inc bx
        cmp bx, 6
        jb .validate
        CHECK "bad_fields", ebp, 0
        mov ebx, [time_bcd]
        SHOW "bcd_sec_min_hour_day", ebx
        mov ebx, [time_bin]
        SHOW "bin_sec_min_hour_day", ebx
        ENDTEST

        ; 12-hour binary: 1..12 with bit 7 for PM.
        movzx eax, byte [time_bin + 2]
        mov bl, al
        xor bh, bh
        cmp al, 12
        jb .am
        mov bh, 0x80
        sub bl, 12
.am:
        test bl, bl
        jnz .h12
        mov bl, 12
.h12:
        or bl, bh
        movzx ebx, bl
        movzx ecx, byte [hour12]
        TEST "hour12"
        CHECK "hour", ecx, ebx
        ENDTEST

        ; The next update cycle advances the seconds by one.
        call wait_uip_fall
        rdtsc
        sub eax, [tsc_update_1]
        sbb edx, [tsc_update_1 + 4]
        mov ecx, 1000
        cmp edx, ecx
        jae .tsc_odd
        div ecx
        mov [tsc_per_ms], eax
.tsc_odd:
        mov al, RTC_SEC
        call cmos_read16
        call bcd_to_bin
        movzx ecx, al
        movzx eax, byte [time_bin]
        inc eax
        cmp eax, 60
        jb .nowrap
        xor eax, eax
.nowrap:
        mov ebx, eax
        TEST "tick"
        CHECK "sec", ecx, ebx
        ENDTEST

        ; Update-ended interrupt on IRQ 8: C is cleared by reading it first, then each
        ; interrupt reads C (IRQF + UF) to acknowledge; a read right after returns no UF.
        ; IRQ 0 at 1 kHz counts milliseconds meanwhile; the CPU waits in HLT.
        mov word [VEC_MASTER * 4], irq0_handler
        mov dword [ticks], 0
        mov al, RTC_REG_C
        call cmos_read16
        mov al, 0xFA                    ; master: IRQ 0 + cascade
        out PIC1_DATA, al
        mov al, 0xFE                    ; slave: IRQ 8 only
        out PIC2_DATA, al
        mov ax, ((RTC_B_UIE | RTC_B_24H) << 8) | RTC_REG_B
        call cmos_write16
        TEST "uie"
.wait_uie:
        sti
        hlt
        cli
        cmp dword [uie_count], UIE_COUNT
        jae .uie_done
        cmp dword [ticks], 3000
        jb .wait_uie
.uie_done:
        mov eax, [uie_tsc + 8]          ; ms between the two interrupts, by the TSC (IRQ 0
        mov edx, [uie_tsc + 12]         ; ticks get dropped when the host is busy)
        sub eax, [uie_tsc]
        sbb edx, [uie_tsc + 4]
        mov ebx, 0xFFFFFFFF
        mov ecx, [tsc_per_ms]
        test ecx, ecx
        jz .uie_timed
        cmp edx, ecx
        jae .uie_timed
        div ecx
        mov ebx, eax
.uie_timed:
        mov ax, (RTC_B_24H << 8) | RTC_REG_B
        call cmos_write16
        mov al, 0xFF
        out PIC1_DATA, al
        out PIC2_DATA, al
        mov al, RTC_REG_C
        call cmos_read16
        movzx ecx, al
        and ecx, RTC_C_IRQF | RTC_C_UF
        CHECK "count", dword [uie_count], UIE_COUNT
        movzx eax, byte [reg_c_seen]
        and eax, RTC_C_IRQF | RTC_C_UF
        CHECK "c_first", eax, RTC_C_IRQF | RTC_C_UF
        movzx eax, byte [reg_c_seen + 1]
        and eax, RTC_C_IRQF | RTC_C_UF
        CHECK "c_second", eax, RTC_C_IRQF | RTC_C_UF
        CHECK "c_after", ecx, 0
        SHOWDEC "ms_between", ebx
        xor ecx, ecx                    ; loose: either interrupt may come late on a busy host
        cmp ebx, 500
        jb .interval_done
        cmp ebx, 1500
        ja .interval_done
        inc ecx
.interval_done:
        CHECK "in_500_1500", ecx, 1
        ENDTEST

        ; Every wait above ended on an update cycle; at least one must have seen UIP itself.
        ; Polling can miss the 244 us window when the host deschedules the vCPU, so while
        ; none has, wait for up to 8 more updates.
        mov ebp, 8
.more_edges:
        cmp dword [rtc_uip_edges], 0
        jne .edges_done
        call wait_uip_fall
        dec ebp
        jnz .more_edges
.edges_done:
        mov ebx, [rtc_uip_edges]
        mov ecx, [rtc_uip_missed]
        xor edi, edi
        test ebx, ebx
        setnz al
        movzx edi, al
        TEST "uip"
        SHOWDEC "edges", ebx
        SHOWDEC "missed", ecx
        CHECK "edge_seen", edi, 1
        ENDTEST

        TEST "spurious"
        CHECK "other_vectors", dword [unexpected_count], 0
        ENDTEST
        FINISH

; read_time: the six time fields, in time_* order (sec min hour day month year), to ES:DI.
read_time:
        push si
        push cx
        mov si, rtc_fields
        mov cx, 6
.field:
        lodsb
        call cmos_read16
        stosb
        loop .field
        pop cx
        pop si
        ret

; bcd_to_bin: AL (BCD) -> AL (binary).
bcd_to_bin:
        push cx
        mov cl, al
        shr al, 4
        mov ch, 10
        mul ch
        and cl, 0x0F
        add al, cl
        pop cx
        ret

; wait_uip_fall: return right after an update cycle; FAIL after 3000 ms.
wait_uip_fall:
        call rtc_wait_update16
        jc .timeout
        ret
.timeout:
        FATAL "RTC did not update (no UIP edge, seconds unchanged) within 3000 PIT periods"

irq0_handler:
        inc dword [ticks]
        push ax
        mov al, OCW2_EOI
        out PIC1_CMD, al
        pop ax
        iret

irq8_handler:
        push ax
        push bx
        mov al, RTC_REG_C
        call cmos_read16
        mov bx, [uie_count]
        cmp bx, UIE_COUNT
        jae .counted
        mov [reg_c_seen + bx], al
        shl bx, 3
        push eax
        push edx
        rdtsc
        mov [uie_tsc + bx], eax
        mov [uie_tsc + bx + 4], edx
        pop edx
        pop eax
.counted:
        inc dword [uie_count]
        mov al, OCW2_EOI
        out PIC2_CMD, al
        out PIC1_CMD, al
        pop bx
        pop ax
        iret

%assign v 0
%rep 16
 %if v != 8
unexpected_ %+ v:
        push ax
        inc dword [unexpected_count]
        mov al, OCW2_EOI
  %if v >= 8
        out PIC2_CMD, al
  %endif
        out PIC1_CMD, al
        pop ax
        iret
 %endif
%assign v v + 1
%endrep

rtc_fields:             db RTC_SEC, RTC_MIN, RTC_HOUR, RTC_DAY, RTC_MONTH, RTC_YEAR
field_min:              db 0, 0, 0, 1, 1, 0
field_max:              db 59, 59, 23, 31, 12, 99
time_print_order:       db 5, 4, 3, 2, 1, 0          ; year month day hour min sec ...
                        db '-', '-', ' ', ':', ':', ' '   ; ... each followed by this
        align 4
time_bcd:               times 8 db 0
time_bin:               times 8 db 0
ticks:                  dd 0
uie_count:              dd 0
uie_tsc:                times UIE_COUNT dq 0
tsc_update_1:           dq 0
tsc_per_ms:             dd 0
unexpected_count:       dd 0
reg_c_seen:             times UIE_COUNT db 0
hour12:                 db 0

%include "print.inc"
%include "pc.inc"
%include "end.inc"
