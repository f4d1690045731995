; A boot sector for the machine tests: counts its boots in CMOS byte 0x5F (CMOS RAM survives a
; reset), prints "boot N", resets the machine through the i8042 (0x64 <- 0xFE) until it has
; booted three times, then waits for a byte on COM1 and exits through isa-debug-exit with the
; count (exit status 7) — so a QMP client has all the time it needs to read the RESET events.
        bits 16
        org 0x7C00
COM1    equ 0x3F8
start:  cli
        mov al, 0x5F
        out 0x70, al
        in al, 0x71
        inc al
        mov bl, al
        mov al, 0x5F
        out 0x70, al
        mov al, bl
        out 0x71, al
        mov dx, COM1
        mov al, 'b'
        out dx, al
        mov al, 'o'
        out dx, al
        out dx, al
        mov al, 't'
        out dx, al
        mov al, ' '
        out dx, al
        mov al, bl
        add al, '0'
        out dx, al
        mov al, 13
        out dx, al
        mov al, 10
        out dx, al
        cmp bl, 3
        jae done
        mov al, 0xFE
        out 0x64, al
.wait:  hlt
        jmp .wait
done:   mov dx, COM1 + 5            ; LSR: wait for data ready
        in al, dx
        test al, 1
        jz done
        mov dx, 0x501
        mov al, bl
        out dx, al
        hlt
        jmp done
        times 510-($-$$) db 0
        dw 0xAA55
