; serial - the simplest guest: programs the 16550 at COM1 directly (divisor, LCR, FIFO, MCR),
; checks its registers read back as a 16550A does, loops bytes back through the UART (MSR
; mirror, receive FIFO order and overrun), takes the THR-empty interrupt on IRQ 4, and prints
; text by polling LSR.  Real mode.

%include "boot.inc"

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/serial start"

        ; Divisor latch: 9600 baud (divisor 12) reads back through DLAB, then back to 115200.
        ; Nothing may be printed while DLAB or loopback is on: values are collected first.
        mov dx, COM1 + UART_LCR
        mov al, 0x83                    ; DLAB + 8N1
        out dx, al
        mov dx, COM1 + UART_DLL
        mov al, 12
        out dx, al
        mov dx, COM1 + UART_DLM
        xor al, al
        out dx, al
        call read_divisor
        mov [dl_9600], ebx
        mov dx, COM1 + UART_DLL
        mov al, 1
        out dx, al
        call read_divisor
        mov [dl_115200], ebx
        mov dx, COM1 + UART_LCR
        mov al, 0x03                    ; DLAB off
        out dx, al
        in al, dx
        movzx ebx, al
        TEST "divisor"
        CHECK "dl_9600", dword [dl_9600], 0x000C
        CHECK "dl_115200", dword [dl_115200], 0x0001
        CHECK "lcr", ebx, 0x03
        ENDTEST

        mov dx, COM1 + UART_SCR
        mov al, 0x5A
        out dx, al
        in al, dx
        movzx ebx, al
        mov al, 0xA5
        out dx, al
        in al, dx
        movzx ecx, al
        TEST "scratch"
        CHECK "scr_5a", ebx, 0x5A
        CHECK "scr_a5", ecx, 0xA5
        ENDTEST

        ; Idle state with FIFOs on: IER reads 0, IIR = FIFO-enabled + no interrupt pending,
        ; LSR = THR empty + transmitter empty once the last byte has gone.
        call wait_temt
        mov dx, COM1 + UART_IER
        in al, dx
        movzx ebx, al
        mov dx, COM1 + UART_IIR
        in al, dx
        movzx ecx, al
        mov dx, COM1 + UART_LSR
        in al, dx
        movzx edi, al
        TEST "idle"
        CHECK "ier", ebx, 0x00
        CHECK "iir", ecx, 0xC1
        CHECK "lsr", edi, 0x60
        ENDTEST

        ; THR-empty interrupt: enabling ETBEI with the THR empty raises it (IIR=C2); reading
        ; IIR while it is the reported source clears it (IIR=C1).  CPU interrupts stay off.
        call wait_temt
        mov dx, COM1 + UART_IER
        mov al, 0x02
        out dx, al
        mov dx, COM1 + UART_IIR
        in al, dx
        movzx ebx, al
        in al, dx
        movzx ecx, al
        mov dx, COM1 + UART_IER
        xor al, al
        out dx, al
        TEST "thri"
        CHECK "iir_thri", ebx, 0xC2
        CHECK "iir_after", ecx, 0xC1
        ENDTEST

        ; Loopback: MSR mirrors MCR (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD), bytes sent
        ; come back through RBR in order, DR follows the receive FIFO.
        call wait_temt
        mov dx, COM1 + UART_MCR
        mov al, 0x1F                    ; LOOP + OUT2 + OUT1 + RTS + DTR
        out dx, al
        mov dx, COM1 + UART_MSR
        in al, dx
        mov [msr_1f], al
        mov dx, COM1 + UART_MCR
        mov al, 0x11                    ; LOOP + DTR
        out dx, al
        mov dx, COM1 + UART_MSR
        in al, dx
        mov [msr_11], al
        mov si, loop_bytes
        mov cx, loop_bytes_len
.send:
        lodsb
        mov dx, COM1 + UART_THR
        out dx, al
        call wait_temt
        loop .send
        mov dx, COM1 + UART_LSR
        in al, dx
        mov [lsr_dr], al
        xor ebx, ebx                    ; the bytes back, the first one ending in the top byte
        mov cx, loop_bytes_len
.recv:
        mov dx, COM1 + UART_RBR
        in al, dx
        shl ebx, 8
        mov bl, al
        loop .recv
        mov dx, COM1 + UART_LSR
        in al, dx
        mov [lsr_empty], al
        mov dx, COM1 + UART_MCR
        mov al, 0x03
        out dx, al
        TEST "loopback"
        movzx eax, byte [msr_1f]
        CHECK "msr_1f", eax, 0xF0
        movzx eax, byte [msr_11]
        CHECK "msr_11", eax, 0x20
        movzx eax, byte [lsr_dr]
        CHECK "lsr_rx", eax, 0x61       ; data ready, THR and transmitter empty
        CHECK "rbr", ebx, 0x5AA5C30F
        movzx eax, byte [lsr_empty]
        CHECK "lsr_drained", eax, 0x60
        ENDTEST

        ; Receive FIFO: of 17 bytes looped back into the 16-byte FIFO the first 16 come back in
        ; order.  QEMU 7.2 drops the 17th without setting OE in LSR (a 16550A would set it).
        call wait_temt
        mov dx, COM1 + UART_MCR
        mov al, 0x13                    ; LOOP + RTS + DTR
        out dx, al
        xor bl, bl
.fill:
        mov al, bl
        add al, 0x40
        mov dx, COM1 + UART_THR
        out dx, al
        call wait_temt
        inc bl
        cmp bl, 17
        jb .fill
        mov dx, COM1 + UART_LSR
        in al, dx
        mov [lsr_full], al
        in al, dx
        mov [lsr_again], al
        xor ebx, ebx                    ; sum of (byte - 0x40 + 1) * position must match
        xor ecx, ecx
        xor edi, edi                    ; bytes read while DR was set
.drain:
        mov dx, COM1 + UART_LSR
        in al, dx
        test al, UART_LSR_DR
        jz .drained
        mov dx, COM1 + UART_RBR
        in al, dx
        inc edi
        movzx eax, al
        sub eax, 0x40
        cmp eax, ecx
        jne .order_bad
        inc ecx
        cmp edi, 32
        jb .drain
        jmp .drained
.order_bad:
        or ebx, 1
        cmp edi, 32
        jb .drain
.drained:
        mov dx, COM1 + UART_MCR
        mov al, 0x03
        out dx, al
        TEST "rx_fifo"
        movzx eax, byte [lsr_full]
        CHECK "lsr_full", eax, 0x61     ; DR + THRE + TEMT (no OE, as QEMU)
        movzx eax, byte [lsr_again]
        CHECK "lsr_again", eax, 0x61
        CHECK "bytes_back", edi, 16
        CHECK "out_of_order", ebx, 0
        ENDTEST

        ; THR-empty interrupt through IRQ 4 and the PIC (vector 0x24): one when ETBEI is
        ; enabled with THR empty, one more after a byte has gone.
        mov bx, (0x28 << 8) | 0x20
        call pic_init16
        mov word [0x24 * 4], uart_irq
        mov word [0x24 * 4 + 2], 0
        mov al, 0xEF                    ; IRQ 4 only
        out PIC1_DATA, al
        mov ecx, PIT_1KHZ
        call pit_start16                ; time base for the waits (no interrupt)
        call wait_temt
        mov dx, COM1 + UART_MCR
        mov al, 0x0B                    ; OUT2 (the PC's IRQ gate) + RTS + DTR
        out dx, al
        mov dx, COM1 + UART_IER
        mov al, 0x02
        out dx, al
        sti
        mov ecx, 5
        call pit_wait16
        mov ebx, [uart_irqs]            ; after enabling
        mov al, '#'
        mov dx, COM1 + UART_THR
        out dx, al
        mov ecx, 5
        call pit_wait16
        cli
        mov ecx, [uart_irqs]            ; after one byte
        mov dx, COM1 + UART_IER
        xor al, al
        out dx, al
        mov al, 0xFF
        out PIC1_DATA, al
        call crlf16
        TEST "irq4"
        CHECK "after_enable", ebx, 1
        CHECK "after_byte", ecx, 2
        movzx eax, byte [uart_iir]
        CHECK "iir_in_handler", eax, 0xC2
        ENDTEST

        TEST "text"
        PUTS " the quick brown fox jumps over the lazy dog 0123456789"
        ENDTEST
        PUTS "ascii:"
        mov al, 0x20
.ascii:
        call putc16
        inc al
        cmp al, 0x7F
        jne .ascii
        call crlf16
        FINISH

uart_irq:
        push ax
        push dx
        mov dx, COM1 + UART_IIR         ; reading IIR acknowledges the THR-empty interrupt
        in al, dx
        mov [uart_iir], al
        inc dword [uart_irqs]
        mov al, OCW2_EOI
        out PIC1_CMD, al
        pop dx
        pop ax
        iret

; read_divisor: EBX = DLM:DLL read with DLAB set (LCR left at 0x83).
read_divisor:
        mov dx, COM1 + UART_LCR
        mov al, 0x83
        out dx, al
        mov dx, COM1 + UART_DLM
        in al, dx
        mov bh, al
        mov dx, COM1 + UART_DLL
        in al, dx
        mov bl, al
        movzx ebx, bx
        ret

; wait_temt: poll LSR until the transmitter is empty (bounded).
wait_temt:
        push ecx
        push ax
        push dx
        mov ecx, 0x100000
        mov dx, COM1 + UART_LSR
.poll:
        in al, dx
        test al, UART_LSR_TEMT
        jnz .done
        dec ecx
        jnz .poll
.done:
        pop dx
        pop ax
        pop ecx
        ret

loop_bytes:     db 0x5A, 0xA5, 0xC3, 0x0F
loop_bytes_len  equ $ - loop_bytes
        align 4
dl_9600:        dd 0
dl_115200:      dd 0
msr_1f:         db 0
msr_11:         db 0
lsr_dr:         db 0
lsr_empty:      db 0
lsr_full:       db 0
lsr_again:      db 0
uart_iir:       db 0
        align 4
uart_irqs:      dd 0

%include "print.inc"
%include "pc.inc"
%include "end.inc"
