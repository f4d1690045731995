; A 64 KiB BIOS ROM for test_machine_pio_string.py: reads 30000 words from port 0x1F0 with
; one REP INSW into 2000:0000, then writes 0 to isa-debug-exit.
        bits 16
        org 0
        times 0xE000 db 0xFF
start:  cld
        mov ax, 0x2000
        mov es, ax
        xor di, di
        mov dx, 0x1F0
        mov cx, 30000
        rep insw
        mov dx, 0x501
        xor al, al
        out dx, al
.halt:  cli
        hlt
        jmp .halt
        times 0xFFF0-($-$$) db 0xFF
        jmp 0xF000:0xE000               ; reset vector
        times 0x10000-($-$$) db 0xFF
