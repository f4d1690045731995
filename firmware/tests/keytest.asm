; keytest: INT 16h keyboard input from COM1 and INT 10h AH=13h, for emu's BIOS.
;
; Prints "keytest ready" with INT 10h AH=13h, then for two keys: polls INT 16h AH=01h until a
; key is waiting (printed "PEEK xxxx", not consumed), takes it with AH=00h / AH=10h ("KEY xxxx";
; the two must agree), and exits through isa-debug-exit (0x10 = pass, 0x11 = fail).
; Build: nasm -f bin -o keytest.bin keytest.asm

        cpu     686
        bits    16
        org     0x7C00

        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        cld
        mov     ax, 0x1301              ; write string, move the cursor
        mov     bx, 0x0007
        mov     cx, ready_len
        mov     bp, ready
        int     0x10
        mov     byte [fails], 0
        mov     byte [func], 0x00
        call    one_key
        mov     byte [func], 0x10
        call    one_key
        mov     si, pass
        mov     bl, 0x10
        cmp     byte [fails], 0
        je      .out
        mov     si, fail
        mov     bl, 0x11
.out:   call    puts
        mov     al, bl
        mov     dx, 0x501
        out     dx, al
.halt:  cli
        hlt
        jmp     .halt

one_key:
.poll:  mov     ah, 0x01
        int     0x16
        jz      .poll                   ; ZF=1: nothing yet
        mov     di, ax
        mov     si, peek
        call    puts
        call    hex16
        mov     ah, [func]
        int     0x16
        mov     si, key
        call    puts
        call    hex16
        cmp     ax, di
        je      .ok
        inc     byte [fails]
.ok:    ret

puts:                                   ; DS:SI
        push    ax
.l:     lodsb
        test    al, al
        jz      .d
        mov     ah, 0x0E
        int     0x10
        jmp     .l
.d:     pop     ax
        ret

hex16:                                  ; AX, then CR LF; preserves AX
        push    ax
        push    cx
        mov     cx, 4
.d:     rol     ax, 4
        push    ax
        and     al, 0x0F
        add     al, '0'
        cmp     al, '9'
        jbe     .p
        add     al, 7
.p:     mov     ah, 0x0E
        int     0x10
        pop     ax
        loop    .d
        mov     ax, 0x0E0D
        int     0x10
        mov     ax, 0x0E0A
        int     0x10
        pop     cx
        pop     ax
        ret

ready:  db      "keytest ready", 13, 10
ready_len equ   $ - ready
peek:   db      "PEEK ", 0
key:    db      "KEY ", 0
pass:   db      "PASS", 13, 10, 0
fail:   db      "FAIL", 13, 10, 0
fails   equ     0x600
func    equ     0x601

        times   510 - ($ - $$) db 0
        dw      0xAA55
