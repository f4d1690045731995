; A boot sector for the machine tests: prints "ticker up", then one '.' per delay loop for ever,
; so a test can see the vCPU run, stop (no more dots) and resume.  On "x" typed on COM1 it
; leaves through isa-debug-exit with value 0x2A (exit status 0x55).
        bits 16
        org 0x7C00
COM1    equ 0x3F8
start:  cli
        xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, 0x7C00
        mov si, msg
.puts:  lodsb
        test al, al
        jz tick
        mov dx, COM1
        out dx, al
        jmp .puts
tick:   mov dx, COM1
        mov al, '.'
        out dx, al
        mov ecx, 0x4000         ; ~20k port reads per dot: tens of ms on emu
.delay: mov dx, COM1 + 5        ; LSR: data ready?
        in al, dx
        test al, 1
        jz .next
        mov dx, COM1
        in al, dx
        cmp al, 'x'
        je quit
.next:  dec ecx
        jnz .delay
        jmp tick
quit:   mov dx, 0x501
        mov al, 0x2A
        out dx, al
        hlt
        jmp quit
msg:    db "ticker up", 13, 10, 0
        times 510-($-$$) db 0
        dw 0xAA55
