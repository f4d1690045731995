; biostest: a boot-sector test guest for PC BIOSes (ours and SeaBIOS alike).
;
; Sector 0 loads the rest of the program with INT 13h AH=02h (CHS) and jumps to it.  The
; program then exercises INT 10h/11h/12h/13h/15h/16h/1Ah, prints what it finds on COM1 (through
; INT 10h teletype), checks it, and ends with a line "PASS" or "FAIL" and a write to the
; isa-debug-exit port (0x501): 0x10 for pass, 0x11 for fail (QEMU exit status 33 / 35).
;
; The disk is prepared by the test (tests/guests/firmware/biostest.py):
;   LBA 0..PROG_SECTORS   this program
;   LBA CFG_LBA           configuration: see CFG_* below
;   elsewhere             "pattern" sectors: qword LBA, then byte i = (LBA * 7 + i) & 0xFF
; Sectors this program writes hold: dword tag, dword "MTRW", then byte i = (tag*13 + i*3) & 0xFF.
; Build: nasm -f bin -o biostest.bin biostest.asm

        cpu     686
        bits    16
        org     0x7C00

PROG_SECTORS    equ     24              ; loaded after the boot sector
CFG_LBA         equ     48
DEBUG_EXIT      equ     0x501
EXIT_PASS       equ     0x10
EXIT_FAIL       equ     0x11
WRITE_MAGIC     equ     0x5752544D

; variables and buffers (all in segment 0 unless noted)
V_DRIVE         equ     0x500           ; byte: boot drive
V_FAILS         equ     0x502           ; word
V_NDRIVES       equ     0x504           ; byte
V_HEADS         equ     0x506           ; word: INT 13h geometry of the boot drive
V_SPT           equ     0x508           ; word
V_TICKS         equ     0x50C           ; dword
V_SECS          equ     0x510           ; dword
V_DIRECT        equ     0x514           ; byte: CFG_CONSOLE once the configuration is read
DAP             equ     0x0700          ; 16-byte disk address packet
CFG             equ     0x0800          ; the configuration sector
CFG_MAGIC       equ     CFG + 0         ; "EMUBTCFG"
CFG_TOTAL       equ     CFG + 8         ; qword: disk size in sectors
CFG_WRITE_LBA   equ     CFG + 16        ; dword: 3 sectors written with AH=43h
CFG_CHSW_LBA    equ     CFG + 20        ; dword: 1 sector written with AH=03h
CFG_HIGH_LBA    equ     CFG + 24        ; qword: LBA48 test area (0: none)
CFG_READ_LBA    equ     CFG + 32        ; dword: 8 pattern sectors read with AH=42h
CFG_CONSOLE     equ     CFG + 36        ; byte: 0 print with INT 10h, 1 write COM1 directly
                                        ; (for firmwares whose INT 10h has no serial output)
EDDBUF          equ     0x0A00
E820BUF         equ     0x0C00
SEG_A           equ     0x2000          ; 64 KiB buffers
SEG_B           equ     0x3000

%macro PUTS 1
        call    puts_inline
        db      %1, 0
%endmacro

%macro FAIL 1
        call    fail_inline
        db      %1, 0
%endmacro

; ---- sector 0 ----------------------------------------------------------------------------------
boot:
        cli
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     sp, 0x7C00
        sti
        cld
        mov     [V_DRIVE], dl
        mov     word [V_FAILS], 0
        mov     byte [V_DIRECT], 0
        PUTS    "biostest: boot drive "
        mov     al, dl
        call    hex8
        call    crlf
        mov     ax, 0x0200 | PROG_SECTORS
        mov     cx, 0x0002              ; cylinder 0, sector 2
        mov     dh, 0
        mov     dl, [V_DRIVE]
        mov     bx, 0x7E00
        int     0x13
        jc      .loadfail
        cmp     al, PROG_SECTORS
        jne     .loadfail
        jmp     main
.loadfail:
        FAIL    "loader: INT 13h AH=02h"
        jmp     finish

puts_inline:                            ; print the string after the call
        push    bp
        mov     bp, sp
        push    si
        mov     si, [bp + 2]
        call    puts
        mov     [bp + 2], si
        pop     si
        pop     bp
        ret

fail_inline:
        push    bp
        mov     bp, sp
        push    si
        inc     word [V_FAILS]
        mov     si, .prefix
        call    puts
        mov     si, [bp + 2]
        call    puts
        mov     [bp + 2], si
        call    crlf
        pop     si
        pop     bp
        ret
.prefix: db     "FAIL: ", 0

puts:                                   ; DS:SI, NUL-terminated; SI past the NUL
        push    ax
.l:     lodsb
        test    al, al
        jz      .d
        call    putc
        jmp     .l
.d:     pop     ax
        ret

putc:                                   ; INT 10h teletype (or COM1, see CFG_CONSOLE)
        push    ax
        push    bx
        cmp     byte [V_DIRECT], 0
        jne     .uart
        mov     ah, 0x0E
        mov     bx, 0x0007
        int     0x10
        pop     bx
        pop     ax
        ret
.uart:  push    dx
        mov     ah, al
        mov     dx, 0x3FD
.wait:  in      al, dx
        test    al, 0x20
        jz      .wait
        mov     al, ah
        mov     dx, 0x3F8
        out     dx, al
        pop     dx
        pop     bx
        pop     ax
        ret

crlf:
        push    ax
        mov     al, 13
        call    putc
        mov     al, 10
        call    putc
        pop     ax
        ret

hex4:
        push    ax
        and     al, 0x0F
        add     al, '0'
        cmp     al, '9'
        jbe     .o
        add     al, 7
.o:     call    putc
        pop     ax
        ret
hex8:
        push    ax
        shr     al, 4
        call    hex4
        pop     ax
        jmp     hex4
hex16:
        xchg    al, ah
        call    hex8
        xchg    al, ah
        jmp     hex8
hex32:
        ror     eax, 16
        call    hex16
        ror     eax, 16
        jmp     hex16

finish:
        cmp     word [V_FAILS], 0
        jne     .fail
        PUTS    `PASS\r\n`
        mov     al, EXIT_PASS
        jmp     .out
.fail:  PUTS    `FAIL\r\n`
        mov     al, EXIT_FAIL
.out:   push    ax                      ; let a buffering console (SeaBIOS sercon) drain
        mov     ah, 0x86
        mov     cx, 0x0002
        mov     dx, 0x0000              ; 131 ms
        int     0x15
        pop     ax
        mov     dx, DEBUG_EXIT
        out     dx, al
.halt:  cli
        hlt
        jmp     .halt

%if ($ - $$) > 446
%error "boot sector code runs into the partition table"
%endif
        times   510 - ($ - $$) db 0             ; empty partition table: QEMU then
        dw      0xAA55                          ; reports its default geometry

; ---- the program ---------------------------------------------------------------------------------
main:
        call    read_config
        call    test_edd_check
        call    test_geometry
        call    test_chs_read
        call    test_ext_read
        call    test_writes
        call    test_errors
        call    test_disk_misc
        call    test_lba48
        call    test_e820
        call    test_memory_sizes
        call    test_misc
        call    test_a20
        call    test_move
        call    test_time
        call    test_pcibios
        call    dump_pci
        jmp     finish

; LBA EAX -> CH/CL/DH for the boot drive's geometry (V_HEADS, V_SPT).
lba_to_chs:
        push    ebx
        push    eax
        movzx   ebx, word [V_SPT]
        xor     edx, edx
        div     ebx                     ; EAX = track, EDX = sector - 1
        inc     dx
        mov     cl, dl                  ; sector
        movzx   ebx, word [V_HEADS]
        xor     edx, edx
        div     ebx                     ; EAX = cylinder, EDX = head
        mov     dh, dl
        mov     ch, al
        shl     ah, 6
        or      cl, ah
        pop     eax
        pop     ebx
        ret

; Check that the sector at ES:0 is the pattern sector for LBA EBX:EAX.  CF=1 if not.
check_pattern:
        push    eax
        push    cx
        push    di
        cmp     [es:0], eax
        jne     .bad
        cmp     [es:4], ebx
        jne     .bad
        mov     ah, al
        mov     al, 7
        mul     ah                      ; AL = LBA * 7 (mod 256)
        add     al, 8
        mov     di, 8
        mov     cx, 512 - 8
.l:     cmp     [es:di], al
        jne     .bad
        inc     al
        inc     di
        loop    .l
        clc
        jmp     .done
.bad:   stc
.done:  pop     di
        pop     cx
        pop     eax
        ret

; Fill the sector at ES:0 as a written sector with tag EAX.
fill_written:
        push    eax
        push    cx
        push    di
        mov     [es:0], eax
        mov     dword [es:4], WRITE_MAGIC
        mov     ah, 13
        mul     ah                      ; AL = tag * 13
        add     al, 8 * 3
        mov     di, 8
        mov     cx, 512 - 8
.l:     mov     [es:di], al
        add     al, 3
        inc     di
        loop    .l
        pop     di
        pop     cx
        pop     eax
        ret

; Compare CX sectors at ES:0 and FS:0 (both segments advance).  CF=1 on a difference.
compare_sectors:
        push    es
        push    fs
        push    cx
        push    si
.s:     push    cx
        xor     si, si
        mov     cx, 512 / 4
.w:     mov     eax, [es:si]
        cmp     eax, [fs:si]
        jne     .bad
        add     si, 4
        loop    .w
        pop     cx
        mov     ax, es
        add     ax, 0x20
        mov     es, ax
        mov     ax, fs
        add     ax, 0x20
        mov     fs, ax
        loop    .s
        clc
        jmp     .done
.bad:   pop     cx
        stc
.done:  pop     si
        pop     cx
        pop     fs
        pop     es
        ret

test_edd_check:
        mov     ah, 0x41
        mov     bx, 0x55AA
        mov     dl, [V_DRIVE]
        int     0x13
        jc      .bad
        cmp     bx, 0xAA55
        jne     .bad
        PUTS    "EDD41 AH="
        mov     al, ah
        call    hex8
        PUTS    " CX="
        mov     ax, cx
        call    hex16
        call    crlf
        test    cl, 1                   ; fixed disk access subset
        jz      .bad
        ret
.bad:   FAIL    "INT 13h AH=41h"
        ret

read_config:
        xor     ax, ax
        mov     es, ax
        mov     di, CFG
        mov     eax, CFG_LBA
        xor     ebx, ebx
        mov     cx, 1
        call    ext_read_eax
        jc      .bad
        cmp     dword [CFG_MAGIC], 'EMUB'
        jne     .bad
        cmp     dword [CFG_MAGIC + 4], 'TCFG'
        jne     .bad
        mov     al, [CFG_CONSOLE]
        mov     [V_DIRECT], al
        PUTS    `CONFIG ok\r\n`
        ret
.bad:   FAIL    "config sector (INT 13h AH=42h)"
        jmp     finish

; AH=08h / 15h / 48h for every hard disk; keep the boot drive's geometry.
test_geometry:
        mov     ah, 0x08
        mov     dl, 0x80
        xor     di, di
        mov     es, di
        int     0x13
        jc      .bad08
        mov     [V_NDRIVES], dl
        test    dl, dl
        jz      .bad08
        mov     bl, 0x80
.drive: PUTS    "DRIVE "
        mov     al, bl
        call    hex8
        call    crlf
        ; AH=08h
        mov     ah, 0x08
        mov     dl, bl
        push    bx
        int     0x13
        pop     bx
        jc      .bad08
        PUTS    "GEOM AX="
        push    ax
        call    hex16
        PUTS    " CX="
        mov     ax, cx
        call    hex16
        PUTS    " DX="
        mov     ax, dx
        call    hex16
        call    crlf
        pop     ax
        cmp     bl, [V_DRIVE]
        jne     .t15
        movzx   ax, dh
        inc     ax
        mov     [V_HEADS], ax
        mov     al, cl
        and     ax, 0x3F
        mov     [V_SPT], ax
.t15:   ; AH=15h
        mov     ah, 0x15
        mov     dl, bl
        push    bx
        int     0x13
        pop     bx
        jc      .bad15
        cmp     ah, 0x03
        jne     .bad15
        PUTS    "TYPE CX="
        mov     ax, cx
        call    hex16
        PUTS    " DX="
        mov     ax, dx
        call    hex16
        call    crlf
        ; AH=48h with a 26-byte buffer
        mov     word [EDDBUF], 26
        mov     si, EDDBUF
        mov     ah, 0x48
        mov     dl, bl
        push    bx
        int     0x13
        pop     bx
        jc      .bad48
        PUTS    "EDDP flags="
        mov     ax, [EDDBUF + 2]
        call    hex16
        PUTS    " cyl="
        mov     eax, [EDDBUF + 4]
        call    hex32
        PUTS    " heads="
        mov     eax, [EDDBUF + 8]
        call    hex32
        PUTS    " spt="
        mov     eax, [EDDBUF + 12]
        call    hex32
        PUTS    " sectors="
        mov     eax, [EDDBUF + 20]
        call    hex32
        mov     eax, [EDDBUF + 16]
        call    hex32
        PUTS    " bps="
        mov     ax, [EDDBUF + 24]
        call    hex16
        call    crlf
        cmp     word [EDDBUF + 24], 512
        jne     .bad48
        mov     ax, 74                  ; EDD 3.0, T13 layout
        call    edd3_dump
        jc      .bad48
        mov     ax, 66                  ; EDD 3.0, Phoenix layout
        call    edd3_dump
        jc      .bad48
        cmp     bl, [V_DRIVE]
        jne     .next
        mov     eax, [EDDBUF + 16]
        cmp     eax, [CFG_TOTAL]
        jne     .bad48
        mov     eax, [EDDBUF + 20]
        cmp     eax, [CFG_TOTAL + 4]
        jne     .bad48
.next:  inc     bl
        mov     al, bl
        sub     al, 0x80
        cmp     al, [V_NDRIVES]
        jb      .drive
        ret
.bad08: FAIL    "INT 13h AH=08h"
        ret
.bad15: FAIL    "INT 13h AH=15h"
        ret
.bad48: FAIL    "INT 13h AH=48h"
        ret

; AH=48h for drive BL with an AX-byte buffer: print "EDD<size> <bytes>" (the DPTE pointer
; shown as zeros) and "DPTE <16 bytes>" when the BIOS gave one.  CF=1 if the call failed.
edd3_dump:
        push    bx
        push    ax
        mov     di, EDDBUF
        mov     cx, 80
.z:     mov     byte [di], 0
        inc     di
        loop    .z
        pop     ax
        mov     [EDDBUF], ax
        push    ax
        mov     si, EDDBUF
        mov     ah, 0x48
        mov     dl, bl
        int     0x13
        pop     cx                      ; CX = size asked for
        jc      .done
        PUTS    "EDD"
        mov     al, cl
        call    hex8
        PUTS    " "
        mov     eax, [EDDBUF + 26]      ; the DPTE far pointer
        mov     dword [EDDBUF + 26], 0
        push    eax
        mov     si, EDDBUF
.b:     lodsb
        call    hex8
        loop    .b
        call    crlf
        pop     eax
        cmp     word [EDDBUF], 30
        jb      .ok
        PUTS    "DPTE "
        mov     si, ax                  ; (putc needs DS = 0: read through ES)
        shr     eax, 16
        mov     es, ax
        mov     cx, 16
.d:     mov     al, [es:si]
        inc     si
        call    hex8
        loop    .d
        call    crlf
.ok:    clc
.done:  pop     bx
        ret

; CHS read of 4 sectors across the end of cylinder 0 (and a head wrap), then check them.
test_chs_read:
        mov     ax, [V_HEADS]
        mul     word [V_SPT]
        movzx   eax, ax
        sub     eax, 2                  ; last two sectors of cylinder 0
        push    eax
        call    lba_to_chs
        mov     ax, SEG_A
        mov     es, ax
        xor     bx, bx
        mov     dl, [V_DRIVE]
        mov     ax, 0x0204
        int     0x13
        pop     ebx                     ; EBX = first LBA
        jc      .bad
        cmp     al, 4
        jne     .bad
        mov     eax, ebx
        xor     ebx, ebx
        mov     cx, 4
.chk:   call    check_pattern
        jc      .bad
        inc     eax
        mov     dx, es
        add     dx, 0x20
        mov     es, dx
        loop    .chk
        PUTS    `CHSREAD ok\r\n`
        ret
.bad:   FAIL    "CHS read across a cylinder boundary"
        ret

; AH=42h: 8 sectors into 1000:FF00, i.e. across a 64 KiB boundary (linear addressing).
test_ext_read:
        mov     ax, 0x1000
        mov     es, ax
        mov     di, 0xFF00
        mov     eax, [CFG_READ_LBA]
        xor     ebx, ebx
        mov     cx, 8
        call    ext_read_eax
        jc      .bad
        cmp     cx, 8
        jne     .bad
        mov     eax, [CFG_READ_LBA]
        xor     ebx, ebx
        mov     dx, 0x1FF0              ; linear 0x1FF00
        mov     cx, 8
.chk:   mov     es, dx
        call    check_pattern
        jc      .bad
        inc     eax
        add     dx, 0x20
        loop    .chk
        PUTS    `EXTREAD ok\r\n`
        ret
.bad:   FAIL    "INT 13h AH=42h read of 8 sectors"
        ret

; AH=42h of CX sectors at LBA EAX (high dword EBX) to ES:DI on the boot drive.
ext_read_eax:
        push    word 0x42
        jmp     ext_common
ext_write_eax:
        push    word 0x43
ext_common:
        mov     byte [DAP], 16
        mov     byte [DAP + 1], 0
        mov     [DAP + 2], cx
        mov     [DAP + 4], di
        mov     [DAP + 6], es
        mov     [DAP + 8], eax
        mov     [DAP + 12], ebx
        pop     ax
        mov     ah, al
        mov     al, 0
        mov     dl, [V_DRIVE]
        mov     si, DAP
        int     0x13
        mov     cx, [DAP + 2]
        ret

; AH=43h 3 sectors + AH=03h 1 sector, each read back and compared.
test_writes:
        mov     ax, SEG_A
        mov     es, ax
        mov     eax, [CFG_WRITE_LBA]
        mov     cx, 3
.fill:  call    fill_written
        inc     eax
        mov     dx, es
        add     dx, 0x20
        mov     es, dx
        loop    .fill
        mov     ax, SEG_A
        mov     es, ax
        xor     di, di
        mov     eax, [CFG_WRITE_LBA]
        xor     ebx, ebx
        mov     cx, 3
        call    ext_write_eax
        jc      .bad43
        cmp     cx, 3
        jne     .bad43
        mov     ax, SEG_B
        mov     es, ax
        xor     di, di
        mov     eax, [CFG_WRITE_LBA]
        xor     ebx, ebx
        mov     cx, 3
        call    ext_read_eax
        jc      .bad43
        mov     ax, SEG_A
        mov     fs, ax
        mov     cx, 3
        call    compare_sectors
        jc      .bad43
        PUTS    `EXTWRITE ok\r\n`
        ; CHS write of one sector, read back with CHS
        mov     ax, SEG_A
        mov     es, ax
        mov     eax, [CFG_CHSW_LBA]
        or      eax, 0x80000000
        call    fill_written
        mov     eax, [CFG_CHSW_LBA]
        call    lba_to_chs
        xor     bx, bx
        mov     dl, [V_DRIVE]
        mov     ax, 0x0301
        int     0x13
        jc      .bad03
        cmp     al, 1
        jne     .bad03
        mov     ax, SEG_B
        mov     es, ax
        mov     eax, [CFG_CHSW_LBA]
        call    lba_to_chs
        xor     bx, bx
        mov     dl, [V_DRIVE]
        mov     ax, 0x0201
        int     0x13
        jc      .bad03
        mov     ax, SEG_A
        mov     fs, ax
        mov     cx, 1
        call    compare_sectors
        jc      .bad03
        PUTS    `CHSWRITE ok\r\n`
        ret
.bad43: FAIL    "INT 13h AH=43h write + read back"
        ret
.bad03: FAIL    "INT 13h AH=03h write + read back"
        ret

; Error paths give CF=1 and the status in AH (and in AH=01h afterwards).
test_errors:
        ; start LBA = disk size
        mov     ax, SEG_A
        mov     es, ax
        xor     di, di
        mov     eax, [CFG_TOTAL]
        mov     ebx, [CFG_TOTAL + 4]
        mov     cx, 1
        call    ext_read_eax
        jnc     .bad_range
        PUTS    "ERANGE AH="
        mov     al, ah
        call    hex8
        call    crlf
        cmp     ah, 0x01
        jne     .bad_range
        ; the last sector itself reads fine
        mov     eax, [CFG_TOTAL]
        mov     ebx, [CFG_TOTAL + 4]
        sub     eax, 1
        sbb     ebx, 0
        mov     cx, 1
        push    eax
        push    ebx
        call    ext_read_eax
        pop     ebx
        pop     eax
        jc      .bad_last
        call    check_pattern
        jc      .bad_last
        ; CHS sector 0 is invalid
        xor     bx, bx
        mov     cx, 0x0000
        mov     dh, 0
        mov     dl, [V_DRIVE]
        mov     ax, 0x0201
        int     0x13
        jnc     .bad_chs
        cmp     ah, 0x01
        jne     .bad_chs
        mov     ah, 0x01                ; last status
        mov     dl, [V_DRIVE]
        int     0x13
        jnc     .bad_status
        cmp     ah, 0x01
        jne     .bad_status
        ; a drive that is not there
        mov     dl, [V_NDRIVES]
        add     dl, 0x80
        mov     ax, 0x0201
        mov     cx, 0x0001
        mov     dh, 0
        xor     bx, bx
        int     0x13
        jnc     .bad_nodrive
        ; no floppy drives: AH=08h on drive 00h fails
        mov     ah, 0x08
        mov     dl, 0x00
        int     0x13
        jnc     .bad_nodrive
        ; an unknown function
        mov     ah, 0x3F
        mov     dl, [V_DRIVE]
        int     0x13
        jnc     .bad_func
        PUTS    "EFUNC AH="
        mov     al, ah
        call    hex8
        call    crlf
        ; a read that starts on the last sector and runs past the end: the drive fails the
        ; second sector; CF=1, the packet's count says what was transferred
        mov     ax, SEG_A
        mov     es, ax
        xor     di, di
        mov     eax, [CFG_TOTAL]
        mov     ebx, [CFG_TOTAL + 4]
        sub     eax, 1
        sbb     ebx, 0
        mov     cx, 2
        call    ext_read_eax
        jnc     .bad_partial
        PUTS    "EPARTIAL AH="
        mov     al, ah
        call    hex8
        PUTS    " count="
        mov     ax, cx
        call    hex16
        call    crlf
        PUTS    `ERRORS ok\r\n`
        ret
.bad_func:
        FAIL    "INT 13h with an unknown function must fail"
        ret
.bad_partial:
        FAIL    "INT 13h AH=42h across the end of the disk must fail"
        ret
.bad_range:
        FAIL    "INT 13h AH=42h past the end must fail with AH=01h"
        ret
.bad_last:
        FAIL    "INT 13h AH=42h of the last sector"
        ret
.bad_chs:
        FAIL    "INT 13h AH=02h with sector 0 must fail with AH=01h"
        ret
.bad_status:
        FAIL    "INT 13h AH=01h after an error"
        ret
.bad_nodrive:
        FAIL    "INT 13h on a missing drive must fail"
        ret

; The other INT 13h functions on the boot drive: print AH (and CF as "+" when set) of each,
; in order: 00 04 05 09 0C 0D 10 11 14 44 45 46 47 49; then a read must still work.
disk_misc_calls:
        db      0x00, 0x04, 0x05, 0x09, 0x0C, 0x0D, 0x10, 0x11, 0x14, 0x44, 0x45, 0x46, 0x47, 0x49
disk_misc_count equ $ - disk_misc_calls
test_disk_misc:
        PUTS    "DMISC"
        xor     si, si
.next:  mov     ah, [disk_misc_calls + si]
        push    si
        cmp     ah, 0x44
        jb      .chs
        push    ax                      ; extended calls: a packet for 1 sector at READ_LBA
        mov     byte [DAP], 16
        mov     byte [DAP + 1], 0
        mov     word [DAP + 2], 1
        mov     word [DAP + 4], 0
        mov     word [DAP + 6], SEG_A
        mov     eax, [CFG_READ_LBA]
        mov     [DAP + 8], eax
        mov     dword [DAP + 12], 0
        mov     si, DAP
        pop     ax
.chs:   mov     al, 1                   ; 1 sector (verify), 1 sector per track (format)
        mov     cx, 0x0001              ; cylinder 0, sector 1
        xor     dh, dh
        mov     dl, [V_DRIVE]
        push    ax
        mov     ax, SEG_A
        mov     es, ax
        pop     ax
        xor     bx, bx
        int     0x13
        pop     si
        pushf
        PUTS    " "
        mov     al, ah
        call    hex8
        popf
        jnc     .nocf
        PUTS    "+"
.nocf:  inc     si
        cmp     si, disk_misc_count
        jb      .next
        call    crlf
        mov     ax, SEG_A               ; still readable after all that
        mov     es, ax
        xor     di, di
        mov     eax, [CFG_READ_LBA]
        xor     ebx, ebx
        mov     cx, 1
        call    ext_read_eax
        jc      .bad
        mov     eax, [CFG_READ_LBA]
        xor     ebx, ebx
        call    check_pattern
        jc      .bad
        ret
.bad:   FAIL    "read after INT 13h AH=00h..49h"
        ret

; LBA48: read 4 pattern sectors starting 2 below 2^28 (so the range needs LBA48), write one
; above and read it back.
test_lba48:
        mov     eax, [CFG_HIGH_LBA]
        or      eax, [CFG_HIGH_LBA + 4]
        jz      .skip
        mov     ax, SEG_A
        mov     es, ax
        xor     di, di
        mov     eax, [CFG_HIGH_LBA]
        mov     ebx, [CFG_HIGH_LBA + 4]
        mov     cx, 4
        call    ext_read_eax
        jc      .bad
        mov     eax, [CFG_HIGH_LBA]
        mov     ebx, [CFG_HIGH_LBA + 4]
        mov     cx, 4
.chk:   call    check_pattern
        jc      .bad
        add     eax, 1
        adc     ebx, 0
        mov     dx, es
        add     dx, 0x20
        mov     es, dx
        loop    .chk
        mov     ax, SEG_A
        mov     es, ax
        mov     eax, [CFG_HIGH_LBA]
        add     eax, 8
        call    fill_written
        mov     ebx, [CFG_HIGH_LBA + 4]
        mov     cx, 1
        call    ext_write_eax
        jc      .bad
        mov     ax, SEG_B
        mov     es, ax
        mov     eax, [CFG_HIGH_LBA]
        add     eax, 8
        mov     ebx, [CFG_HIGH_LBA + 4]
        mov     cx, 1
        call    ext_read_eax
        jc      .bad
        mov     ax, SEG_A
        mov     fs, ax
        mov     cx, 1
        call    compare_sectors
        jc      .bad
        PUTS    `LBA48 ok\r\n`
.skip:  ret
.bad:   FAIL    "LBA48 read/write"
        ret

; E820: walk the map, print it, check the basics.
test_e820:
        xor     ebx, ebx
        xor     si, si                  ; entries seen
.next:  xor     ax, ax
        mov     es, ax
        mov     di, E820BUF
        mov     eax, 0xE820
        mov     edx, 0x534D4150
        mov     ecx, 20
        push    si
        int     0x15
        pop     si
        jc      .done_cf
        cmp     eax, 0x534D4150
        jne     .bad
        PUTS    "E820 "
        mov     eax, [E820BUF + 4]
        call    hex32
        mov     eax, [E820BUF]
        call    hex32
        PUTS    " "
        mov     eax, [E820BUF + 12]
        call    hex32
        mov     eax, [E820BUF + 8]
        call    hex32
        PUTS    " "
        mov     eax, [E820BUF + 16]
        call    hex8
        call    crlf
        test    si, si
        jnz     .notfirst
        cmp     dword [E820BUF], 0      ; the first entry: usable RAM from 0
        jne     .bad
        cmp     dword [E820BUF + 16], 1
        jne     .bad
.notfirst:
        inc     si
        cmp     si, 32
        ja      .bad
        test    ebx, ebx
        jnz     .next
        jmp     .done
.done_cf:
        test    si, si                  ; CF on the very first call is a failure
        jz      .bad
.done:  cmp     si, 3
        jb      .bad
        ret
.bad:   FAIL    "INT 15h E820"
        ret

test_memory_sizes:
        mov     ax, 0xE801
        xor     bx, bx
        xor     cx, cx
        xor     dx, dx
        int     0x15
        jc      .bad801
        PUTS    "E801 AX="
        call    hex16
        PUTS    " BX="
        mov     ax, bx
        call    hex16
        PUTS    " CX="
        mov     ax, cx
        call    hex16
        PUTS    " DX="
        mov     ax, dx
        call    hex16
        call    crlf
        mov     ah, 0x88
        int     0x15
        jc      .bad88
        PUTS    "MEM88 AX="
        call    hex16
        call    crlf
        int     0x12
        PUTS    "INT12 AX="
        call    hex16
        call    crlf
        cmp     ax, 512
        jb      .bad12
        cmp     ax, 640
        ja      .bad12
        ret
.bad801:
        FAIL    "INT 15h E801h"
        ret
.bad88: FAIL    "INT 15h AH=88h"
        ret
.bad12: FAIL    "INT 12h"
        ret

test_misc:
        int     0x11
        PUTS    "INT11 AX="
        call    hex16
        call    crlf
        mov     ah, 0xC0
        int     0x15
        jc      .badc0
        cmp     byte [es:bx + 2], 0xFC  ; model: AT
        jne     .badc0
        mov     ah, 0x01                ; no key waiting
        int     0x16
        jnz     .bad16
        mov     ah, 0x02
        int     0x16
        PUTS    `MISC ok\r\n`
        ret
.badc0: FAIL    "INT 15h AH=C0h"
        ret
.bad16: FAIL    "INT 16h AH=01h: a key where none was typed"
        ret

; A20 through INT 15h AX=240xh: off wraps FFFF:0510 onto 0:0500, on does not.
test_a20:
        mov     ax, 0x2403
        int     0x15
        jc      .bad
        mov     ax, 0x2400
        int     0x15
        jc      .bad
        call    a20_wraps
        jnc     .bad
        mov     ax, 0x2402
        int     0x15
        jc      .bad
        cmp     al, 0
        jne     .bad
        mov     ax, 0x2401
        int     0x15
        jc      .bad
        call    a20_wraps
        jc      .bad
        mov     ax, 0x2402
        int     0x15
        cmp     al, 1
        jne     .bad
        PUTS    `A20 ok\r\n`
        ret
.bad:   FAIL    "A20 via INT 15h AX=2400h-2403h"
        ret

; INT 15h AH=87h: one sector to 3 MiB and back (with A20 off on entry: the BIOS must turn it
; on for the copy and off again).
MOVE_GDT        equ     0x0900
test_move:
        mov     ax, SEG_A
        mov     es, ax
        mov     eax, 0x87
        call    fill_written
        mov     ax, 0x2400
        int     0x15
        mov     eax, SEG_A << 4
        mov     ebx, 0x300000
        call    move_sector
        jc      .bad
        mov     eax, 0x300000
        mov     ebx, SEG_B << 4
        call    move_sector
        jc      .bad
        mov     ax, 0x2402
        int     0x15
        cmp     al, 0
        jne     .bad_a20
        mov     ax, 0x2401
        int     0x15
        mov     ax, SEG_B
        mov     es, ax
        mov     ax, SEG_A
        mov     fs, ax
        mov     cx, 1
        call    compare_sectors
        jc      .bad
        PUTS    `MOVE ok\r\n`
        ret
.bad:   FAIL    "INT 15h AH=87h"
        ret
.bad_a20:
        FAIL    "INT 15h AH=87h left A20 on"
        ret

; Copy 512 bytes from linear EAX to linear EBX with INT 15h AH=87h.  CF from the BIOS.
move_sector:
        push    es
        xor     cx, cx
        mov     es, cx
        mov     di, MOVE_GDT
        mov     cx, 48
.z:     mov     byte [di], 0
        inc     di
        loop    .z
        mov     word [MOVE_GDT + 0x10], 0xFFFF
        mov     [MOVE_GDT + 0x12], eax
        mov     byte [MOVE_GDT + 0x15], 0x93
        shr     eax, 24
        mov     [MOVE_GDT + 0x17], al
        mov     word [MOVE_GDT + 0x18], 0xFFFF
        mov     [MOVE_GDT + 0x1A], ebx
        mov     byte [MOVE_GDT + 0x1D], 0x93
        shr     ebx, 24
        mov     [MOVE_GDT + 0x1F], bl
        mov     si, MOVE_GDT
        mov     cx, 256
        mov     ah, 0x87
        int     0x15
        pop     es
        jc      .done
        test    ah, ah
        jz      .done
        stc
.done:  ret

a20_wraps:                              ; CF=1 if 0x100500 aliases 0x000500
        push    ds
        push    es
        xor     ax, ax
        mov     ds, ax
        mov     ax, 0xFFFF
        mov     es, ax
        mov     byte [0x580], 0x12
        mov     byte [es:0x590], 0x34   ; linear 0x100580
        cmp     byte [0x580], 0x34
        pop     es
        pop     ds
        je      .wraps
        clc
        ret
.wraps: stc
        ret

; INT 1Ah time and date, ticks against the RTC, INT 15h AH=86h against the ticks.
test_time:
        mov     ah, 0x02
        int     0x1A
        jc      .bad
        PUTS    "TIME "
        mov     al, ch
        call    hex8
        PUTS    ":"
        mov     al, cl
        call    hex8
        PUTS    ":"
        mov     al, dh
        call    hex8
        call    crlf
        ; seconds since midnight (BCD -> binary)
        mov     al, ch
        call    bcd2bin
        movzx   eax, al
        imul    eax, eax, 3600
        mov     [V_SECS], eax
        mov     al, cl
        call    bcd2bin
        movzx   eax, al
        imul    eax, eax, 60
        add     [V_SECS], eax
        mov     al, dh
        call    bcd2bin
        movzx   eax, al
        add     [V_SECS], eax
        mov     ah, 0x04
        int     0x1A
        jc      .bad
        PUTS    "DATE "
        mov     al, ch
        call    hex8
        mov     al, cl
        call    hex8
        PUTS    "-"
        mov     al, dh
        call    hex8
        PUTS    "-"
        mov     al, dl
        call    hex8
        call    crlf
        mov     ah, 0x00
        int     0x1A
        mov     [V_TICKS], dx
        mov     [V_TICKS + 2], cx
        PUTS    "TICKS "
        mov     eax, [V_TICKS]
        call    hex32
        call    crlf
        ; ticks * 65536 / 1193182 must be the RTC's seconds, give or take 3 s
        mov     eax, [V_SECS]
        cmp     eax, 10
        jb      .wait
        cmp     eax, 86390
        ja      .wait
        mov     eax, [V_TICKS]
        mov     ebx, 65536
        mul     ebx
        mov     ebx, 1193182
        div     ebx
        sub     eax, [V_SECS]
        jns     .pos
        neg     eax
.pos:   cmp     eax, 3
        ja      .badticks
.wait:  mov     ah, 0x00
        int     0x1A
        mov     [V_TICKS], dx
        mov     [V_TICKS + 2], cx
        mov     ah, 0x86                ; 330 ms = 6 ticks
        mov     cx, 0x0005
        mov     dx, 0x0910              ; 0x50910 = 330000 us
        int     0x15
        jc      .badwait
        mov     ah, 0x00
        int     0x1A
        shl     ecx, 16
        mov     cx, dx
        sub     ecx, [V_TICKS]
        PUTS    "WAIT ticks="
        mov     eax, ecx
        call    hex32
        call    crlf
        cmp     ecx, 3                  ; (a loaded host may lose a tick or two)
        jb      .badwait
        cmp     ecx, 40                 ; (or stretch the wait: bounded, not exact)
        ja      .badwait
        ret
.bad:   FAIL    "INT 1Ah time/date"
        ret
.badticks:
        FAIL    "INT 1Ah tick count does not match the RTC time"
        ret
.badwait:
        FAIL    "INT 15h AH=86h wait (or the tick)"
        ret

bcd2bin:                                ; AL BCD -> AL binary
        push    bx
        mov     bl, al
        shr     al, 4
        mov     bh, 10
        mul     bh
        and     bl, 0x0F
        add     al, bl
        pop     bx
        ret

; INT 1Ah AH=B1h: print "PCIBIOS" and what each call returns (AH, then the result), in order:
; B101 (AL BX CL EDX), B102 8086:7010 #0 (BX) and #1, B103 class 010180 #0 (BX), B10A ID,
; B109 class word, B108 pin, B10B/B108 line write + read back (then restored), B1FF.
test_pcibios:
        PUTS    "PCIBIOS"
        mov     ax, 0xB101
        xor     edi, edi
        int     0x1A
        call    .status
        call    hex8
        mov     ax, bx
        call    .word
        mov     al, cl
        call    .byte
        mov     eax, edx
        call    .dword
        mov     ax, 0xB102
        mov     cx, 0x7010
        mov     dx, 0x8086
        xor     si, si
        int     0x1A
        call    .status
        mov     ax, bx
        call    hex16
        mov     [V_TICKS], bx           ; (scratch) the IDE function
        mov     ax, 0xB102
        mov     cx, 0x7010
        mov     dx, 0x8086
        mov     si, 1
        int     0x1A
        call    .status
        mov     ax, 0xB103
        mov     ecx, 0x010180
        xor     si, si
        int     0x1A
        call    .status
        mov     ax, bx
        call    hex16
        mov     bx, [V_TICKS]
        mov     ax, 0xB10A
        mov     di, 0x00
        int     0x1A
        call    .status
        mov     eax, ecx
        call    hex32
        mov     ax, 0xB109
        mov     di, 0x0A
        int     0x1A
        call    .status
        mov     ax, cx
        call    hex16
        mov     ax, 0xB108
        mov     di, 0x3D
        int     0x1A
        call    .status
        mov     al, cl
        call    hex8
        mov     ax, 0xB108              ; line: save, write 5, read back, restore
        mov     di, 0x3C
        int     0x1A
        push    cx
        mov     ax, 0xB10B
        mov     cl, 0x05
        int     0x1A
        call    .status
        mov     ax, 0xB108
        int     0x1A
        call    .status
        mov     al, cl
        call    hex8
        pop     cx
        mov     ax, 0xB10B
        int     0x1A
        mov     ax, 0xB1FF
        int     0x1A
        call    .status
        call    crlf
        ret
.status:                                ; " AH" and "+" if CF; keeps AX..EDX
        pushf
        PUTS    " "
        push    ax
        mov     al, ah
        call    hex8
        pop     ax
        popf
        jnc     .nc
        PUTS    "+"
.nc:    PUTS    ":"
        ret
.byte:  PUTS    ","
        jmp     hex8
.word:  PUTS    ","
        jmp     hex16
.dword: PUTS    ","
        jmp     hex32

; Print bus 0's configuration as the firmware left it.
dump_pci:
        xor     bx, bx                  ; bdf
.fn:    mov     cl, 0x00
        call    pci_read
        cmp     ax, 0xFFFF
        je      .absent
        PUTS    "PCI "
        mov     al, bl
        call    hex8
        PUTS    " ID="
        mov     cl, 0x00
        call    pci_read
        call    hex32
        mov     cl, 0x04
        call    pci_read
        PUTS    " CMD="
        call    hex16
        mov     cl, 0x10
.bar:   PUTS    " "
        call    pci_read
        call    hex32
        add     cl, 4
        cmp     cl, 0x28
        jb      .bar
        mov     cl, 0x30
        PUTS    " ROM="
        call    pci_read
        call    hex32
        mov     cl, 0x3C
        call    pci_read
        PUTS    " INT="
        call    hex16
        call    crlf
        cmp     bl, 0x08                ; PIIX3 ISA bridge: PIRQ routing
        jne     .ide
        mov     cl, 0x60
        call    pci_read
        PUTS    "PIRQ "
        call    hex32
        PUTS    " ELCR "
        mov     dx, 0x4D0
        in      al, dx
        call    hex8
        mov     dx, 0x4D1
        in      al, dx
        call    hex8
        call    crlf
.ide:   cmp     bl, 0x09                ; PIIX3 IDE: decode enables
        jne     .next
        mov     cl, 0x40
        call    pci_read
        PUTS    "IDETIM "
        call    hex32
        call    crlf
        jmp     .next
.absent:
        test    bl, 7
        jnz     .next
        or      bl, 7                   ; no function 0: skip the device
.next:  inc     bl
        jnz     .fn
        ret

pci_read:                               ; BL = devfn (bus 0), CL = register -> EAX
        push    dx
        movzx   eax, bl
        shl     eax, 8
        mov     al, cl
        or      eax, 0x80000000
        mov     dx, 0xCF8
        out     dx, eax
        mov     dx, 0xCFC
        in      eax, dx
        pop     dx
        ret

        times   512 * (PROG_SECTORS + 1) - ($ - $$) db 0
