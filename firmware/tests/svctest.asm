; svctest: the BIOS services that need no disk, in one boot sector.
;
; Boots normally (from 0:7C00), or is injected by a test into RAM at 0:7C00 and entered through
; the IRQ 0 vector while the BIOS halts (for a machine without a disk controller yet): entered
; that way (SS:SP inside the BIOS's stack, IRQ 0 in service) it acknowledges the PIC and puts the
; BIOS's INT 08h vector (saved by the injector at 0:07F0) back first.
; Prints: E820 entries, E801/88h, INT 1Ah time, the ticks an INT 15h AH=86h wait of
; 330 ms took, a dword AH=87h copied above 1 MiB (with A20 off before), then PASS/FAIL; exits through isa-debug-exit
; (0x10 pass, 0x11 fail).
; Build: nasm -f bin -o svctest.bin svctest.asm

        cpu     686
        bits    16
        org     0x7C00

INJECTED_MAGIC  equ     0x07F4          ; dword "INJ!" when entered through IRQ 0
SAVED_INT08     equ     0x07F0          ; the BIOS's INT 08h vector, saved by the injector
BUF             equ     0x0600

        cli
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        cld
        cmp     dword [INJECTED_MAGIC], 'INJ!'
        jne     .booted
        mov     dword [INJECTED_MAGIC], 0
        mov     eax, [SAVED_INT08]
        mov     [0x08 * 4], eax
        mov     al, 0x20                ; EOI for the tick that brought us here
        out     0x20, al
.booted:
        mov     ss, ax
        mov     sp, 0x7C00
        sti
        xor     bp, bp                  ; BP: failures
        ; E820
        xor     ebx, ebx
.e820:  mov     eax, 0xE820
        mov     edx, 0x534D4150
        mov     ecx, 20
        mov     di, BUF
        int     0x15
        jc      .bad_e820
        cmp     eax, 0x534D4150
        jne     .bad_e820
        mov     si, s_e820
        call    puts
        mov     eax, [BUF + 4]
        call    hex32
        mov     eax, [BUF]
        call    hex32
        call    space
        mov     eax, [BUF + 8]
        call    hex32
        call    space
        mov     al, [BUF + 16]
        call    hex8
        call    crlf
        test    ebx, ebx
        jnz     .e820
        jmp     .sizes
.bad_e820:
        inc     bp
.sizes: mov     ax, 0xE801
        int     0x15
        adc     bp, 0
        mov     si, s_e801
        call    puts
        call    hex16
        call    space
        mov     ax, bx
        call    hex16
        mov     ah, 0x88
        int     0x15
        adc     bp, 0
        call    space
        call    hex16
        call    crlf
        ; time and date
        mov     ah, 0x02
        int     0x1A
        adc     bp, 0
        mov     si, s_time
        call    puts
        mov     ax, cx
        call    hex16
        mov     al, dh
        call    hex8
        call    crlf
        ; INT 15h AH=86h: 330 ms are about 6 ticks
        mov     ah, 0x00
        int     0x1A
        push    cx
        push    dx
        mov     ah, 0x86
        mov     cx, 0x0005
        mov     dx, 0x0910
        int     0x15
        adc     bp, 0
        mov     ah, 0x00
        int     0x1A
        pop     bx
        sub     dx, bx
        pop     bx
        mov     si, s_wait
        call    puts
        mov     ax, dx
        call    hex16
        call    crlf
        cmp     dx, 3
        jb      .bad_wait
        cmp     dx, 40
        jbe     .a20
.bad_wait:
        inc     bp
.a20:   mov     ax, 0x2400              ; A20 off: INT 15h AH=87h must turn it on to copy
        int     0x15
        mov     di, BUF                 ; GDT: copy 0:7C00 (this code) above 1 MiB
        mov     cx, 48 / 2
        xor     ax, ax
        rep     stosw
        mov     word [BUF + 0x10], 0xFFFF
        mov     dword [BUF + 0x12], 0x93007C00
        mov     word [BUF + 0x18], 0xFFFF
        mov     dword [BUF + 0x1A], 0x93100100  ; to 1 MiB + 256: FFFF:0110
        mov     si, BUF
        mov     cx, 256
        mov     ah, 0x87
        int     0x15
        adc     bp, 0
        mov     ax, 0x2401
        int     0x15
        push    es
        mov     ax, 0xFFFF
        mov     es, ax
        mov     eax, [es:0x0110 + 0x10]
        pop     es
        mov     si, s_move
        call    puts
        call    hex32
        call    crlf
        cmp     eax, [0x7C10]
        je      .done
        inc     bp
.done:  mov     si, s_pass
        mov     bl, 0x10
        test    bp, bp
        jz      .exit
        mov     si, s_fail
        mov     bl, 0x11
.exit:  call    puts
        mov     al, bl
        mov     dx, 0x501
        out     dx, al
.halt:  cli
        hlt
        jmp     .halt

puts:   push    ax
.l:     lodsb
        test    al, al
        jz      .d
        call    putc
        jmp     .l
.d:     pop     ax
        ret
putc:   push    ax
        push    bx
        mov     ah, 0x0E
        mov     bx, 7
        int     0x10
        pop     bx
        pop     ax
        ret
space:  push    ax
        mov     al, ' '
        call    putc
        pop     ax
        ret
crlf:   push    ax
        mov     al, 13
        call    putc
        mov     al, 10
        call    putc
        pop     ax
        ret
hex32:  ror     eax, 16
        call    hex16
        ror     eax, 16
hex16:  xchg    al, ah
        call    hex8
        xchg    al, ah
hex8:   push    ax
        shr     al, 4
        call    .nib
        pop     ax
        push    ax
        call    .nib
        pop     ax
        ret
.nib:   and     al, 0x0F
        add     al, '0'
        cmp     al, '9'
        jbe     .p
        add     al, 7
.p:     jmp     putc

s_e820: db      "E820 ", 0
s_e801: db      "SIZES ", 0
s_time: db      "RTC ", 0
s_wait: db      "WAIT ", 0
s_move: db      "MOVE ", 0
s_pass: db      "PASS", 13, 10, 0
s_fail: db      "FAIL", 13, 10, 0

        times   510 - ($ - $$) db 0
        dw      0xAA55
