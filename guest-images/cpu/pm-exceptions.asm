; pm-exceptions - 32-bit protected mode: exceptions and interrupts through the IDT.
;
; CPL0: #UD, #GP with a selector error code, #DF (#GP through a not-present gate), #PF
; (not-present read and write: CR2 + error code), INT3 through a DPL3 trap gate (IF kept),
; INTO through an interrupt gate (IF cleared).
; CPL3 (entered by IRET, stack switch through the TSS): INT 0x80 through a DPL3 interrupt gate
; (frame, SS:ESP on entry), INT 0x81 through a DPL0 gate -> #GP(0x81*8+2), #PF on a supervisor
; page (error code 5), CLI -> #GP(0), and IRQ 0 from the PIT taken while at CPL3.
; Every exception is recorded (vector, error code, CS:EIP, EFLAGS, frame address, CR2, user
; SS:ESP) and printed next to the value expected.

%include "boot.inc"

SEL_CODE0       equ 0x08
SEL_DATA0       equ 0x10
SEL_CODE3       equ 0x1B
SEL_DATA3       equ 0x23
SEL_TSS         equ 0x28
SEL_BAD         equ 0x0100          ; index 32: beyond the GDT limit

VEC_MASTER      equ 0x20
VEC_SLAVE       equ 0x28
VEC_SYSCALL     equ 0x80            ; DPL3 interrupt gate
VEC_PRIV        equ 0x81            ; DPL0 interrupt gate: CPL3 may not use it
SYS_PROBE       equ 1
SYS_EXIT        equ 2

IDT_BASE        equ 0x11000
PAGE_DIR        equ 0x20000
PAGE_TABLE      equ 0x21000
KSTACK_MAIN     equ 0x28000         ; the kernel's own stack
KSTACK_TOP      equ 0x30000         ; TSS.ESP0
USTACK_TOP      equ 0x38000
PF_ABSENT       equ 0x00300000      ; page not present
PF_SUPER        equ 0x00301000      ; present, supervisor only

; exception record, one per exception taken (ex_records[ex_total])
R_VECTOR        equ 0
R_ERROR         equ 4
R_EIP           equ 8
R_CS            equ 12
R_EFLAGS        equ 16
R_FRAME         equ 20              ; address of the saved EIP on the handler's stack
R_CR2           equ 24
R_ESP3          equ 28              ; saved ESP/SS when the exception came from CPL3
R_SS3           equ 32
R_IFLAGS        equ 36              ; EFLAGS inside the handler
R_SS0           equ 40              ; SS inside the handler
REC_SIZE        equ 44
MAX_RECORDS     equ 16

; EXPECT resume: the next exception is expected; its handler resumes at `resume` (0: where the
; CPU left it, for traps).  Notes the record index in [mark] and ESP for FRAME_IS.
%macro EXPECT 1
        mov dword [ex_resume], %1
        push eax
        mov eax, [ex_total]
        mov [mark], eax
        pop eax
        mov [esp_before], esp
%endmacro

; RECORD: check exactly one exception was taken since EXPECT; EBX = its record.
%macro RECORD 0
        mov ecx, [ex_total]
        sub ecx, [mark]
        CHECK "taken", ecx, 1
        mov ebx, [mark]
        imul ebx, REC_SIZE
        add ebx, ex_records
%endmacro

; FRAME_IS: the CPU pushed EFLAGS, CS, EIP right below the interrupted ESP (no stack switch).
%macro FRAME_IS 0
        mov eax, [esp_before]
        sub eax, 12
        CHECK "frame", dword [ebx + R_FRAME], eax
%endmacro

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/pm-exceptions start"
        cli
        mov bx, (VEC_SLAVE << 8) | VEC_MASTER
        call pic_init16                 ; off the exception vectors, everything masked
        lgdt [gdt_desc]
        mov eax, cr0
        or eax, 1                       ; PE
        mov cr0, eax
        jmp SEL_CODE0:pm_entry

        USE_BITS 32
pm_entry:
        mov ax, SEL_DATA0
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov esp, KSTACK_MAIN

        ; IDT: stub v for every vector, then the special gates.
        xor ecx, ecx
.idt:
        mov eax, ecx
        shl eax, 4
        add eax, stubs
        mov dl, 0x8E                    ; present, DPL0, 32-bit interrupt gate
        call set_gate
        inc ecx
        cmp ecx, 256
        jb .idt
        mov ecx, 3
        mov eax, stubs + 3 * 16
        mov dl, 0xEF                    ; DPL3 trap gate: INT3 from anywhere, IF kept
        call set_gate
        mov ecx, 4
        mov eax, stubs + 4 * 16
        mov dl, 0xEE                    ; DPL3 interrupt gate
        call set_gate
        mov ecx, VEC_MASTER
        mov eax, irq0_entry
        mov dl, 0x8E
        call set_gate
        mov ecx, VEC_SYSCALL
        mov eax, syscall_entry
        mov dl, 0xEE
        call set_gate
        lidt [idt_desc]

        ; TSS descriptor (base split over the descriptor), then TR.
        mov eax, tss
        mov [gdt_tss + 2], ax
        shr eax, 16
        mov [gdt_tss + 4], al
        mov [gdt_tss + 7], ah
        mov ax, SEL_TSS
        ltr ax

        ; Paging: identity-map 4 MiB with user pages, one absent page and one supervisor page.
        mov edi, PAGE_TABLE
        xor ecx, ecx
.pte:
        mov eax, ecx
        shl eax, 12
        or eax, 0x007                   ; present, writable, user
        mov [edi + ecx * 4], eax
        inc ecx
        cmp ecx, 1024
        jb .pte
        mov dword [PAGE_TABLE + (PF_ABSENT >> 12) * 4], 0
        mov dword [PAGE_TABLE + (PF_SUPER >> 12) * 4], PF_SUPER | 0x003
        mov edi, PAGE_DIR
        xor eax, eax
        mov ecx, 1024
        rep stosd
        mov dword [PAGE_DIR], PAGE_TABLE | 0x007

        ;--- CPL0 -------------------------------------------------------------------------
        EXPECT .ud_resume
.ud_at:
        ud2
.ud_resume:
        TEST "ud"
        RECORD
        CHECK "vector", dword [ebx + R_VECTOR], 6
        CHECK "eip", dword [ebx + R_EIP], .ud_at
        CHECK "cs", dword [ebx + R_CS], SEL_CODE0
        FRAME_IS
        ENDTEST

        EXPECT .gp_resume
        mov ax, SEL_BAD
.gp_at:
        mov ds, ax
.gp_resume:
        mov ax, ds
        movzx edi, ax
        TEST "gp_selector"
        RECORD
        CHECK "vector", dword [ebx + R_VECTOR], 13
        CHECK "error", dword [ebx + R_ERROR], SEL_BAD
        CHECK "eip", dword [ebx + R_EIP], .gp_at
        FRAME_IS
        CHECK "ds_unchanged", edi, SEL_DATA0
        ENDTEST

        ; #GP whose gate is not present: #NP while delivering it, two contributory faults
        ; -> #DF with error code 0.
        and byte [IDT_BASE + 13 * 8 + 5], 0x7F
        EXPECT .df_resume
        mov ax, SEL_BAD
.df_at:
        mov ds, ax
.df_resume:
        or byte [IDT_BASE + 13 * 8 + 5], 0x80
        TEST "df"
        RECORD
        CHECK "vector", dword [ebx + R_VECTOR], 8
        CHECK "error", dword [ebx + R_ERROR], 0
        ENDTEST

        mov eax, PAGE_DIR
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000              ; PG
        mov cr0, eax
        jmp .paged
.paged:
        EXPECT .pfr_resume
.pfr_at:
        mov eax, [PF_ABSENT + 0x10]
.pfr_resume:
        TEST "pf_read"
        RECORD
        CHECK "vector", dword [ebx + R_VECTOR], 14
        CHECK "error", dword [ebx + R_ERROR], 0x0     ; not present, read, supervisor
        CHECK "cr2", dword [ebx + R_CR2], PF_ABSENT + 0x10
        CHECK "eip", dword [ebx + R_EIP], .pfr_at
        FRAME_IS
        ENDTEST

        EXPECT .pfw_resume
.pfw_at:
        mov dword [PF_ABSENT + 0x24], 1
.pfw_resume:
        TEST "pf_write"
        RECORD
        CHECK "vector", dword [ebx + R_VECTOR], 14
        CHECK "error", dword [ebx + R_ERROR], 0x2     ; not present, write, supervisor
        CHECK "cr2", dword [ebx + R_CR2], PF_ABSENT + 0x24
        CHECK "eip", dword [ebx + R_EIP], .pfw_at
        ENDTEST

        ; INT3 with IF=1 (every PIC line is masked): a trap gate keeps IF, EIP is after INT3.
        EXPECT 0
        sti
        int3
.int3_after:
        cli
        TEST "int3"
        RECORD
        CHECK "vector", dword [ebx + R_VECTOR], 3
        CHECK "eip", dword [ebx + R_EIP], .int3_after
        mov eax, [ebx + R_IFLAGS]
        and eax, 0x200
        CHECK "if_in_handler", eax, 0x200
        FRAME_IS
        ENDTEST

        ; INTO: nothing with OF=0; with OF=1 vector 4 through an interrupt gate (IF cleared).
        mov eax, [ex_total]
        mov [mark], eax
        mov al, 1
        add al, 1                       ; OF=0
        into
        mov ecx, [ex_total]
        sub ecx, [mark]
        EXPECT 0
        sti
        mov al, 0x7F
        add al, 1                       ; OF=1
        into
.into_after:
        cli
        TEST "into"
        CHECK "taken_with_of0", ecx, 0
        RECORD
        CHECK "vector", dword [ebx + R_VECTOR], 4
        CHECK "eip", dword [ebx + R_EIP], .into_after
        mov eax, [ebx + R_IFLAGS]
        and eax, 0x200
        CHECK "if_in_handler", eax, 0
        mov eax, [ebx + R_EFLAGS]
        and eax, 0xA00                  ; OF and IF as they were
        CHECK "saved_of_if", eax, 0xA00
        ENDTEST

        ;--- CPL3 -------------------------------------------------------------------------
        mov eax, [ex_total]
        mov [mark], eax
        mov eax, user_a
        mov ebx, 0x00000002             ; IF=0, IOPL=0
        call enter_user
        TEST "int80_dpl3"
        CHECK "eax_in", dword [sc_eax], 0x1234ABCD
        CHECK "eax_back", dword [user_result], ~0x1234ABCD
        CHECK "eip", dword [sc_eip], user_a.int80_after
        CHECK "cs", dword [sc_cs], SEL_CODE3
        CHECK "ss0", dword [sc_ss0], SEL_DATA0
        CHECK "frame", dword [sc_frame], KSTACK_TOP - 20
        CHECK "esp3", dword [sc_esp3], USTACK_TOP
        CHECK "ss3", dword [sc_ss3], SEL_DATA3
        mov eax, [sc_eflags]
        and eax, 0x3200                 ; IOPL, IF
        CHECK "eflags", eax, 0
        ENDTEST

        mov ebx, [mark]
        imul ebx, REC_SIZE
        add ebx, ex_records
        TEST "int81_dpl0"
        CHECK "vector", dword [ebx + R_VECTOR], 13
        CHECK "error", dword [ebx + R_ERROR], VEC_PRIV * 8 + 2    ; IDT bit set
        CHECK "eip", dword [ebx + R_EIP], user_a.int81_at
        CHECK "cs", dword [ebx + R_CS], SEL_CODE3
        CHECK "frame", dword [ebx + R_FRAME], KSTACK_TOP - 20
        CHECK "ss0", dword [ebx + R_SS0], SEL_DATA0
        CHECK "esp3", dword [ebx + R_ESP3], USTACK_TOP
        CHECK "ss3", dword [ebx + R_SS3], SEL_DATA3
        ENDTEST

        add ebx, REC_SIZE
        TEST "pf_user"
        CHECK "vector", dword [ebx + R_VECTOR], 14
        CHECK "error", dword [ebx + R_ERROR], 0x5     ; present, read, user
        CHECK "cr2", dword [ebx + R_CR2], PF_SUPER + 8
        CHECK "eip", dword [ebx + R_EIP], user_a.pf_at
        CHECK "cs", dword [ebx + R_CS], SEL_CODE3
        CHECK "frame", dword [ebx + R_FRAME], KSTACK_TOP - 20
        ENDTEST

        add ebx, REC_SIZE
        TEST "cli_user"
        CHECK "vector", dword [ebx + R_VECTOR], 13
        CHECK "error", dword [ebx + R_ERROR], 0
        CHECK "eip", dword [ebx + R_EIP], user_a.cli_at
        mov ecx, [ex_total]
        sub ecx, [mark]
        CHECK "exceptions_at_cpl3", ecx, 3
        ENDTEST

        ; IRQ 0 while at CPL3: the user loop spins with IF=1 until the handler flags it.
        mov ecx, PIT_1KHZ
        call pit_start32
        mov al, 0xFE
        out PIC1_DATA, al
        mov eax, user_b
        mov ebx, 0x00000202             ; IF=1, IOPL=0
        call enter_user
        mov al, 0xFF
        out PIC1_DATA, al
        TEST "irq_cpl3"
        CHECK "seen", dword [irq_seen], 1
        CHECK "cs", dword [irq_cs], SEL_CODE3
        CHECK "ss3", dword [irq_ss3], SEL_DATA3
        CHECK "esp3", dword [irq_esp3], USTACK_TOP
        CHECK "frame", dword [irq_frame], KSTACK_TOP - 20
        mov eax, [irq_eip]
        xor ecx, ecx
        cmp eax, user_b                 ; a tick pending at the IRET lands on the first instruction
        jb .outside
        cmp eax, user_b.spin_end
        ja .outside
        inc ecx
.outside:
        CHECK "eip_in_user_loop", ecx, 1
        mov eax, [irq_eflags]
        and eax, 0x200
        CHECK "saved_if", eax, 0x200
        ENDTEST
        FINISH

;--- helpers (CPL0) ---------------------------------------------------------------------

; set_gate: IDT[ECX] = 32-bit gate to EAX, selector SEL_CODE0, type/attributes DL.
set_gate:
        push edi
        lea edi, [IDT_BASE + ecx * 8]
        mov [edi], ax
        mov word [edi + 2], SEL_CODE0
        mov byte [edi + 4], 0
        mov [edi + 5], dl
        shr eax, 16
        mov [edi + 6], ax
        pop edi
        ret

; enter_user: IRET to CPL3 at EAX with EFLAGS = EBX on the user stack; returns when the user
; code calls SYS_EXIT.
enter_user:
        mov [kernel_esp], esp
        mov cx, SEL_DATA3
        mov ds, cx
        mov es, cx
        mov fs, cx
        mov gs, cx
        push dword SEL_DATA3
        push dword USTACK_TOP
        push ebx
        push dword SEL_CODE3
        push eax
        iretd
.back:
        mov ax, SEL_DATA0
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        ret

; exc_common: every stub lands here with [vector, error code] pushed above the CPU's frame.
exc_common:
        pushad
        mov ebp, esp
        mov ebx, [ex_total]
        cmp ebx, MAX_RECORDS
        jb .room
        mov ebx, MAX_RECORDS - 1
.room:
        imul ebx, REC_SIZE
        add ebx, ex_records
        mov eax, [ebp + 32]
        mov [ebx + R_VECTOR], eax
        mov eax, [ebp + 36]
        mov [ebx + R_ERROR], eax
        mov eax, [ebp + 40]
        mov [ebx + R_EIP], eax
        movzx eax, word [ebp + 44]
        mov [ebx + R_CS], eax
        mov eax, [ebp + 48]
        mov [ebx + R_EFLAGS], eax
        lea eax, [ebp + 40]
        mov [ebx + R_FRAME], eax
        mov eax, cr2
        mov [ebx + R_CR2], eax
        xor eax, eax
        mov [ebx + R_ESP3], eax
        mov [ebx + R_SS3], eax
        test byte [ebp + 44], 3
        jz .same_ring
        mov eax, [ebp + 52]
        mov [ebx + R_ESP3], eax
        movzx eax, word [ebp + 56]
        mov [ebx + R_SS3], eax
.same_ring:
        pushfd
        pop eax
        mov [ebx + R_IFLAGS], eax
        xor eax, eax
        mov ax, ss
        mov [ebx + R_SS0], eax
        inc dword [ex_total]
        mov eax, [ex_resume]
        cmp eax, -1
        je .unexpected
        test eax, eax
        jz .return                      ; traps: carry on after the instruction
        mov [ebp + 40], eax
.return:
        mov dword [ex_resume], -1       ; anything else that arrives is unexpected
        popad
        add esp, 8
        iretd
.unexpected:
        mov ax, SEL_DATA0
        mov ds, ax
        mov es, ax
        PUTS 13, 10, "unexpected exception:"
        SHOW "vector", dword [ebx + R_VECTOR]
        SHOW "error", dword [ebx + R_ERROR]
        SHOW "eip", dword [ebx + R_EIP]
        SHOW "cs", dword [ebx + R_CS]
        SHOW "cr2", dword [ebx + R_CR2]
        FATAL "unexpected exception"

syscall_entry:                          ; INT 0x80, DPL3 interrupt gate
        cmp eax, SYS_EXIT
        je .exit
        mov [sc_eax], eax
        mov [sc_frame], esp
        mov edx, [esp]
        mov [sc_eip], edx
        movzx edx, word [esp + 4]
        mov [sc_cs], edx
        mov edx, [esp + 8]
        mov [sc_eflags], edx
        mov edx, [esp + 12]
        mov [sc_esp3], edx
        movzx edx, word [esp + 16]
        mov [sc_ss3], edx
        xor edx, edx
        mov dx, ss
        mov [sc_ss0], edx
        not eax
        iretd
.exit:
        mov esp, [kernel_esp]           ; drop the user frame: back into enter_user's caller
        jmp enter_user.back

irq0_entry:                             ; IRQ 0, DPL0 interrupt gate
        push eax
        mov eax, [esp + 4]
        mov [irq_eip], eax
        movzx eax, word [esp + 8]
        mov [irq_cs], eax
        mov eax, [esp + 12]
        mov [irq_eflags], eax
        mov eax, [esp + 16]
        mov [irq_esp3], eax
        movzx eax, word [esp + 20]
        mov [irq_ss3], eax
        lea eax, [esp + 4]
        mov [irq_frame], eax
        mov dword [irq_seen], 1
        mov al, 0xFF                    ; one is enough
        out PIC1_DATA, al
        mov al, OCW2_EOI
        out PIC1_CMD, al
        pop eax
        iretd

;--- user code (CPL3) -------------------------------------------------------------------
user_a:
        mov eax, 0x1234ABCD
        int VEC_SYSCALL
.int80_after:
        mov [user_result], eax
        mov dword [ex_resume], .int81_resume
.int81_at:
        int VEC_PRIV
.int81_resume:
        mov dword [ex_resume], .pf_resume
.pf_at:
        mov eax, [PF_SUPER + 8]
.pf_resume:
        mov dword [ex_resume], .cli_resume
.cli_at:
        cli
.cli_resume:
        mov eax, SYS_EXIT
        int VEC_SYSCALL

user_b:
        mov ecx, 400000000
.spin:
        cmp dword [irq_seen], 0
        jne .spin_end
        dec ecx
        jnz .spin
.spin_end:
        mov eax, SYS_EXIT
        int VEC_SYSCALL

;--- exception stubs: 16 bytes each, vector v at stubs + v*16 ----------------------------
        align 16
stubs:
%assign v 0
%rep 256
 %if v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30
        push dword v                    ; the CPU pushed an error code
 %else
        push dword 0
        push dword v
 %endif
        jmp exc_common
        align 16
%assign v v + 1
%endrep

;--- data ----------------------------------------------------------------------------------
        align 8
gdt:
        dq 0
        dq 0x00CF9A000000FFFF           ; 0x08 code, DPL0, 4 GiB
        dq 0x00CF92000000FFFF           ; 0x10 data, DPL0
        dq 0x00CFFA000000FFFF           ; 0x18 code, DPL3
        dq 0x00CFF2000000FFFF           ; 0x20 data, DPL3
gdt_tss:
        dw 103, 0                       ; 0x28 32-bit TSS (base filled in at run time)
        db 0, 0x89, 0x00, 0
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd gdt
idt_desc:
        dw 256 * 8 - 1
        dd IDT_BASE

        align 4
tss:                                    ; only SS0:ESP0 matter; no I/O bitmap (base = limit+1)
        dd 0                            ; link
        dd KSTACK_TOP                   ; ESP0
        dd SEL_DATA0                    ; SS0
        times 22 dd 0
        dw 0                            ; trap flag
        dw 104                          ; I/O map base
        align 4
ex_total:       dd 0
ex_resume:      dd -1
mark:           dd 0
kernel_esp:     dd 0
user_result:    dd 0
sc_eax:         dd 0
sc_eip:         dd 0
sc_cs:          dd 0
sc_eflags:      dd 0
sc_esp3:        dd 0
sc_ss3:         dd 0
sc_ss0:         dd 0
sc_frame:       dd 0
irq_seen:       dd 0
irq_eip:        dd 0
irq_cs:         dd 0
irq_eflags:     dd 0
irq_esp3:       dd 0
irq_ss3:        dd 0
irq_frame:      dd 0
esp_before:     dd 0
ex_records:     times MAX_RECORDS * REC_SIZE db 0

        USE_BITS 16
%include "print.inc"
%include "pc.inc"
        USE_BITS 32
%include "print.inc"
%include "pc.inc"
%include "end.inc"
