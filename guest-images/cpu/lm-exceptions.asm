; lm-exceptions - 64-bit long mode: exceptions, interrupts and SYSCALL through the 64-bit IDT.
;
; CPL0: #UD delivered on an IST stack, #GP with a selector error code, #DF (#GP through a
; not-present gate), #GP(0) for a non-canonical address, #PF (not-present read and write:
; CR2 + error code), INT3.
; CPL3 (entered by IRETQ): SYSCALL/SYSRET round trip (STAR, LSTAR, FMASK: RCX/R11, masked
; RFLAGS, CS/SS on both sides), INT 0x80 through a DPL3 gate on RSP0 from the TSS, INT 0x81
; through a DPL0 gate -> #GP (error 0x81*16+2 as QEMU 7.2 reports it in long mode), #PF on a
; supervisor page, IRQ 0 taken at CPL3 on RSP0.
; Every exception is recorded (vector, error code, CS:RIP, RFLAGS, SS:RSP, frame address, CR2).

%include "boot.inc"

SEL_CODE0       equ 0x08
SEL_DATA0       equ 0x10
SEL_CODE3_32    equ 0x1B            ; SYSRET's base (STAR[63:48]) = 0x18
SEL_DATA3       equ 0x23
SEL_CODE3       equ 0x2B
SEL_TSS         equ 0x30
SEL_BAD         equ 0x0100

VEC_MASTER      equ 0x20
VEC_SLAVE       equ 0x28
VEC_SYSCALL     equ 0x80
VEC_PRIV        equ 0x81
SYS_PROBE       equ 1
SYS_EXIT        equ 2

MSR_EFER        equ 0xC0000080
MSR_STAR        equ 0xC0000081
MSR_LSTAR       equ 0xC0000082
MSR_FMASK       equ 0xC0000084
EFER_SCE        equ 1 << 0
EFER_LME        equ 1 << 8
RFLAGS_IF       equ 1 << 9
RFLAGS_DF       equ 1 << 10

PML4            equ 0x1000
PDPT            equ 0x2000
PD              equ 0x3000
IDT_BASE        equ 0x11000
KSTACK_MAIN     equ 0x28000
SYSCALL_STACK   equ 0x2C000         ; the SYSCALL entry switches to this itself
KSTACK_TOP      equ 0x30000         ; TSS.RSP0
IST1_TOP        equ 0x34000         ; TSS.IST1 (#UD)
USTACK_TOP      equ 0x38000
PF_ABSENT       equ 0x400000        ; 2 MiB page not present
PF_SUPER        equ 0x600000        ; 2 MiB page, supervisor only
NONCANONICAL    equ 0x8000000000000000

R_VECTOR        equ 0
R_ERROR         equ 8
R_RIP           equ 16
R_CS            equ 24
R_RFLAGS        equ 32
R_RSP           equ 40
R_SS            equ 48
R_FRAME         equ 56
R_CR2           equ 64
R_IFLAGS        equ 72
REC_SIZE        equ 80
MAX_RECORDS     equ 16

%macro EXPECT 1
        mov qword [ex_resume], %1
        push rax
        mov rax, [ex_total]
        mov [mark], rax
        pop rax
        mov [rsp_before], rsp
%endmacro

%macro RECORD 0
        mov rcx, [ex_total]
        sub rcx, [mark]
        CHECK "taken", rcx, 1
        mov rbx, [mark]
        imul rbx, REC_SIZE
        add rbx, ex_records
%endmacro

; FRAME_ON top: the CPU aligned the stack `top` down to 16 and pushed SS, RSP, RFLAGS, CS, RIP.
%macro FRAME_ON 1
        mov rax, %1
        and rax, ~0xF
        sub rax, 40
        CHECK "frame", qword [rbx + R_FRAME], rax
%endmacro

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/lm-exceptions start"
        cli
        mov bx, (VEC_SLAVE << 8) | VEC_MASTER
        call pic_init16
        ; Page tables: 2 MiB pages, user 0-4 MiB, 4-6 MiB absent, 6-8 MiB supervisor.
        xor eax, eax
        mov di, PML4
        mov cx, 3 * 4096 / 4
        rep stosd
        mov dword [PML4], PDPT | 0x007
        mov dword [PDPT], PD | 0x007
        mov dword [PD + 0 * 8], 0x000000 | 0x087          ; present, writable, user, 2 MiB
        mov dword [PD + 1 * 8], 0x200000 | 0x087
        mov dword [PD + 3 * 8], PF_SUPER | 0x083          ; supervisor
        lgdt [gdt_desc]
        mov eax, cr4
        or eax, 1 << 5                  ; PAE
        mov cr4, eax
        mov eax, PML4
        mov cr3, eax
        mov ecx, MSR_EFER
        rdmsr
        or eax, EFER_LME | EFER_SCE
        wrmsr
        mov eax, cr0
        or eax, 0x80000001              ; PG + PE: straight from real mode to long mode
        mov cr0, eax
        jmp SEL_CODE0:lm_entry

        USE_BITS 64
lm_entry:
        mov ax, SEL_DATA0
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, KSTACK_MAIN

        xor ecx, ecx
.idt:
        mov rax, rcx
        shl rax, 4
        add rax, stubs
        mov dx, 0x8E00                  ; DPL0 interrupt gate, no IST
        call set_gate
        inc ecx
        cmp ecx, 256
        jb .idt
        mov ecx, 3
        mov rax, stubs + 3 * 16
        mov dx, 0xEE00                  ; INT3 allowed from CPL3
        call set_gate
        mov ecx, 6
        mov rax, stubs + 6 * 16
        mov dx, 0x8E01                  ; #UD on IST1
        call set_gate
        mov ecx, VEC_MASTER
        mov rax, irq0_entry
        mov dx, 0x8E00
        call set_gate
        mov ecx, VEC_SYSCALL
        mov rax, int80_entry
        mov dx, 0xEE00
        call set_gate
        lidt [idt_desc]

        mov rax, tss
        mov [gdt_tss + 2], ax
        shr rax, 16
        mov [gdt_tss + 4], al
        mov [gdt_tss + 7], ah
        mov ax, SEL_TSS
        ltr ax

        ; SYSCALL: CS/SS from STAR[47:32], SYSRET from STAR[63:48]; IF and DF masked.
        mov ecx, MSR_STAR
        xor eax, eax
        mov edx, (0x18 << 16) | SEL_CODE0
        wrmsr
        mov ecx, MSR_LSTAR
        mov rax, syscall_entry
        mov rdx, rax
        shr rdx, 32
        wrmsr
        mov ecx, MSR_FMASK
        mov eax, RFLAGS_IF | RFLAGS_DF
        xor edx, edx
        wrmsr

        ;--- CPL0 -------------------------------------------------------------------------
        EXPECT .ud_resume
.ud_at:
        ud2
.ud_resume:
        TEST "ud_ist"
        RECORD
        CHECK "vector", qword [rbx + R_VECTOR], 6
        CHECK "rip", qword [rbx + R_RIP], .ud_at
        CHECK "cs", qword [rbx + R_CS], SEL_CODE0
        CHECK "rsp", qword [rbx + R_RSP], [rsp_before]
        CHECK "ss", qword [rbx + R_SS], SEL_DATA0
        FRAME_ON IST1_TOP
        ENDTEST

        EXPECT .gp_resume
        mov ax, SEL_BAD
.gp_at:
        mov ds, ax
.gp_resume:
        TEST "gp_selector"
        RECORD
        CHECK "vector", qword [rbx + R_VECTOR], 13
        CHECK "error", qword [rbx + R_ERROR], SEL_BAD
        CHECK "rip", qword [rbx + R_RIP], .gp_at
        FRAME_ON [rsp_before]
        ENDTEST

        ; #GP whose gate is not present: #NP while delivering it, two contributory faults
        ; -> #DF with error code 0.
        and byte [IDT_BASE + 13 * 16 + 5], 0x7F
        EXPECT .df_resume
        mov ax, SEL_BAD
.df_at:
        mov ds, ax
.df_resume:
        or byte [IDT_BASE + 13 * 16 + 5], 0x80
        TEST "df"
        RECORD
        CHECK "vector", qword [rbx + R_VECTOR], 8
        CHECK "error", qword [rbx + R_ERROR], 0
        ENDTEST

        mov rdi, cr2
        mov rsi, NONCANONICAL
        EXPECT .nc_resume
.nc_at:
        mov rax, [rsi]
.nc_resume:
        mov rcx, cr2
        mov rbp, rcx
        TEST "gp_noncanonical"
        RECORD
        CHECK "vector", qword [rbx + R_VECTOR], 13
        CHECK "error", qword [rbx + R_ERROR], 0
        CHECK "rip", qword [rbx + R_RIP], .nc_at
        CHECK "cr2_untouched", rbp, rdi
        ENDTEST

        EXPECT .pfr_resume
.pfr_at:
        mov rax, [PF_ABSENT + 0x10]
.pfr_resume:
        TEST "pf_read"
        RECORD
        CHECK "vector", qword [rbx + R_VECTOR], 14
        CHECK "error", qword [rbx + R_ERROR], 0x0
        CHECK "cr2", qword [rbx + R_CR2], PF_ABSENT + 0x10
        CHECK "rip", qword [rbx + R_RIP], .pfr_at
        FRAME_ON [rsp_before]
        ENDTEST

        EXPECT .pfw_resume
.pfw_at:
        mov qword [PF_ABSENT + 0x28], 1
.pfw_resume:
        TEST "pf_write"
        RECORD
        CHECK "vector", qword [rbx + R_VECTOR], 14
        CHECK "error", qword [rbx + R_ERROR], 0x2
        CHECK "cr2", qword [rbx + R_CR2], PF_ABSENT + 0x28
        CHECK "rip", qword [rbx + R_RIP], .pfw_at
        ENDTEST

        EXPECT 0
        int3
.int3_after:
        TEST "int3"
        RECORD
        CHECK "vector", qword [rbx + R_VECTOR], 3
        CHECK "rip", qword [rbx + R_RIP], .int3_after
        FRAME_ON [rsp_before]
        ENDTEST

        ;--- CPL3 -------------------------------------------------------------------------
        mov rax, [ex_total]
        mov [mark], rax
        mov rax, user_a
        mov rbx, RFLAGS_IF | 2          ; IF=1 (every PIC line is masked), IOPL=0
        call enter_user

        TEST "syscall"
        CHECK "rax_in", qword [sc_rax], 0x1234ABCD
        CHECK "rax_back", qword [user_result], ~0x1234ABCD
        CHECK "rcx", qword [sc_rcx], user_a.syscall_after
        mov rax, [sc_r11]
        and rax, RFLAGS_IF | RFLAGS_DF
        CHECK "r11_if_df", rax, RFLAGS_IF | RFLAGS_DF
        mov rax, [sc_rflags]
        and rax, RFLAGS_IF | RFLAGS_DF
        CHECK "masked_if_df", rax, 0
        CHECK "cs", qword [sc_cs], SEL_CODE0
        CHECK "ss", qword [sc_ss], SEL_DATA0
        CHECK "user_rsp", qword [sc_user_rsp], USTACK_TOP
        CHECK "cs_after", qword [user_cs], SEL_CODE3
        CHECK "ss_after", qword [user_ss], SEL_DATA3
        mov rax, [user_rflags]
        and rax, RFLAGS_DF
        CHECK "df_restored", rax, RFLAGS_DF
        ENDTEST

        TEST "int80_dpl3"
        CHECK "rip", qword [i80_rip], user_a.int80_after
        CHECK "cs", qword [i80_cs], SEL_CODE3
        CHECK "rsp", qword [i80_rsp], USTACK_TOP
        CHECK "ss", qword [i80_ss], SEL_DATA3
        CHECK "frame", qword [i80_frame], KSTACK_TOP - 40
        ENDTEST

        mov rbx, [mark]
        imul rbx, REC_SIZE
        add rbx, ex_records
        TEST "int81_dpl0"
        CHECK "vector", qword [rbx + R_VECTOR], 13
        ; The SDM gives vector*8+2 (0x40A, as the 32-bit guest sees); QEMU 7.2's 64-bit
        ; delivery (do_interrupt64) reports vector*16+2.  emu follows the reference.
        CHECK "error", qword [rbx + R_ERROR], VEC_PRIV * 16 + 2
        CHECK "rip", qword [rbx + R_RIP], user_a.int81_at
        CHECK "cs", qword [rbx + R_CS], SEL_CODE3
        CHECK "rsp", qword [rbx + R_RSP], USTACK_TOP
        CHECK "ss", qword [rbx + R_SS], SEL_DATA3
        CHECK "frame", qword [rbx + R_FRAME], KSTACK_TOP - 40
        ENDTEST

        add rbx, REC_SIZE
        TEST "pf_user"
        CHECK "vector", qword [rbx + R_VECTOR], 14
        CHECK "error", qword [rbx + R_ERROR], 0x5
        CHECK "cr2", qword [rbx + R_CR2], PF_SUPER + 8
        CHECK "rip", qword [rbx + R_RIP], user_a.pf_at
        CHECK "cs", qword [rbx + R_CS], SEL_CODE3
        CHECK "frame", qword [rbx + R_FRAME], KSTACK_TOP - 40
        mov rcx, [ex_total]
        sub rcx, [mark]
        CHECK "exceptions_at_cpl3", rcx, 2
        ENDTEST

        mov ecx, PIT_1KHZ
        call pit_start64
        mov al, 0xFE
        out PIC1_DATA, al
        mov rax, user_b
        mov rbx, RFLAGS_IF | 2
        call enter_user
        mov al, 0xFF
        out PIC1_DATA, al
        TEST "irq_cpl3"
        CHECK "seen", qword [irq_seen], 1
        CHECK "cs", qword [irq_cs], SEL_CODE3
        CHECK "ss", qword [irq_ss], SEL_DATA3
        CHECK "rsp", qword [irq_rsp], USTACK_TOP
        CHECK "frame", qword [irq_frame], KSTACK_TOP - 40
        mov rax, [irq_rip]
        xor ecx, ecx
        cmp rax, user_b                 ; a tick pending at the IRETQ lands on the first instruction
        jb .outside
        cmp rax, user_b.spin_end
        ja .outside
        inc ecx
.outside:
        CHECK "rip_in_user_loop", rcx, 1
        ENDTEST
        FINISH

;--- helpers (CPL0) ---------------------------------------------------------------------

; set_gate: IDT[ECX] = 64-bit gate to RAX; DH = type/attributes, DL = IST index.
set_gate:
        push rdi
        mov rdi, rcx
        shl rdi, 4
        add rdi, IDT_BASE
        mov [rdi], ax
        mov word [rdi + 2], SEL_CODE0
        mov [rdi + 4], dl
        mov [rdi + 5], dh
        shr rax, 16
        mov [rdi + 6], ax
        shr rax, 16
        mov [rdi + 8], eax
        mov dword [rdi + 12], 0
        pop rdi
        ret

; enter_user: IRETQ to CPL3 at RAX with RFLAGS = RBX; returns when user code calls SYS_EXIT.
enter_user:
        mov [kernel_rsp], rsp
        push SEL_DATA3
        push USTACK_TOP
        push rbx
        push SEL_CODE3
        push rax
        iretq
.back:
        mov ax, SEL_DATA0
        mov ds, ax
        mov es, ax
        ret

exc_common:
        push rax
        push rbx
        push rcx
        push rdx
        push rsi
        push rdi
        push rbp
        mov rbp, rsp
        mov rbx, [ex_total]
        cmp rbx, MAX_RECORDS
        jb .room
        mov rbx, MAX_RECORDS - 1
.room:
        imul rbx, REC_SIZE
        add rbx, ex_records
        mov rax, [rbp + 56]
        mov [rbx + R_VECTOR], rax
        mov rax, [rbp + 64]
        mov [rbx + R_ERROR], rax
        mov rax, [rbp + 72]
        mov [rbx + R_RIP], rax
        movzx eax, word [rbp + 80]
        mov [rbx + R_CS], rax
        mov rax, [rbp + 88]
        mov [rbx + R_RFLAGS], rax
        mov rax, [rbp + 96]
        mov [rbx + R_RSP], rax
        movzx eax, word [rbp + 104]
        mov [rbx + R_SS], rax
        lea rax, [rbp + 72]
        mov [rbx + R_FRAME], rax
        mov rax, cr2
        mov [rbx + R_CR2], rax
        pushfq
        pop rax
        mov [rbx + R_IFLAGS], rax
        inc qword [ex_total]
        mov rax, [ex_resume]
        cmp rax, -1
        je .unexpected
        test rax, rax
        jz .return
        mov [rbp + 72], rax
.return:
        mov qword [ex_resume], -1
        pop rbp
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        add rsp, 16
        iretq
.unexpected:
        PUTS 13, 10, "unexpected exception:"
        SHOW "vector", qword [rbx + R_VECTOR]
        SHOW "error", qword [rbx + R_ERROR]
        SHOW "rip", qword [rbx + R_RIP]
        SHOW "cs", qword [rbx + R_CS]
        SHOW "cr2", qword [rbx + R_CR2]
        FATAL "unexpected exception"

; syscall_entry: LSTAR.  Runs on the user's stack until it switches; RCX/R11 hold RIP/RFLAGS.
syscall_entry:
        mov [sc_user_rsp], rsp
        mov rsp, SYSCALL_STACK
        cmp rax, SYS_EXIT
        je .exit
        mov [sc_rax], rax
        mov [sc_rcx], rcx
        mov [sc_r11], r11
        pushfq
        pop qword [sc_rflags]
        mov [sc_cs], cs
        mov [sc_ss], ss
        not rax
        mov rsp, [sc_user_rsp]
        o64 sysret
.exit:
        mov rsp, [kernel_rsp]
        jmp enter_user.back

int80_entry:                            ; DPL3 interrupt gate
        push rax
        mov rax, [rsp + 8]
        mov [i80_rip], rax
        movzx eax, word [rsp + 16]
        mov [i80_cs], rax
        mov rax, [rsp + 32]
        mov [i80_rsp], rax
        movzx eax, word [rsp + 40]
        mov [i80_ss], rax
        lea rax, [rsp + 8]
        mov [i80_frame], rax
        pop rax
        iretq

irq0_entry:
        push rax
        mov rax, [rsp + 8]
        mov [irq_rip], rax
        movzx eax, word [rsp + 16]
        mov [irq_cs], rax
        mov rax, [rsp + 32]
        mov [irq_rsp], rax
        movzx eax, word [rsp + 40]
        mov [irq_ss], rax
        lea rax, [rsp + 8]
        mov [irq_frame], rax
        mov qword [irq_seen], 1
        mov al, 0xFF
        out PIC1_DATA, al
        mov al, OCW2_EOI
        out PIC1_CMD, al
        pop rax
        iretq

;--- user code (CPL3) -------------------------------------------------------------------
user_a:
        mov rax, 0x1234ABCD
        std                             ; FMASK clears DF for the kernel, SYSRET restores it
        syscall
.syscall_after:
        pushfq
        pop qword [user_rflags]
        cld
        mov [user_result], rax
        mov [user_cs], cs
        mov [user_ss], ss
        int VEC_SYSCALL
.int80_after:
        mov qword [ex_resume], .int81_resume
.int81_at:
        int VEC_PRIV
.int81_resume:
        mov qword [ex_resume], .pf_resume
.pf_at:
        mov rax, [PF_SUPER + 8]
.pf_resume:
        mov eax, SYS_EXIT
        syscall

user_b:
        mov ecx, 400000000
.spin:
        cmp qword [irq_seen], 0
        jne .spin_end
        dec ecx
        jnz .spin
.spin_end:
        mov eax, SYS_EXIT
        syscall

        align 16
stubs:
%assign v 0
%rep 256
 %if v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30
        push v
 %else
        push 0
        push v
 %endif
        jmp exc_common
        align 16
%assign v v + 1
%endrep

        align 8
gdt:
        dq 0
        dq 0x00AF9A000000FFFF           ; 0x08 code64, DPL0
        dq 0x00CF92000000FFFF           ; 0x10 data, DPL0
        dq 0x00CFFA000000FFFF           ; 0x18 code32, DPL3 (SYSRET's base)
        dq 0x00CFF2000000FFFF           ; 0x20 data, DPL3
        dq 0x00AFFA000000FFFF           ; 0x28 code64, DPL3
gdt_tss:
        dw 103, 0                       ; 0x30 64-bit TSS, 16 bytes (base filled in at run time)
        db 0, 0x89, 0x00, 0
        dq 0
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd gdt
idt_desc:
        dw 256 * 16 - 1
        dq IDT_BASE

        align 8
tss:
        dd 0
        dq KSTACK_TOP                   ; RSP0
        dq 0, 0                         ; RSP1, RSP2
        dq 0
        dq IST1_TOP                     ; IST1
        times 6 dq 0
        dq 0
        dw 0
        dw 104                          ; I/O map base: none
        align 8
ex_total:       dq 0
ex_resume:      dq -1
mark:           dq 0
rsp_before:     dq 0
kernel_rsp:     dq 0
user_result:    dq 0
user_rflags:    dq 0
user_cs:        dq 0
user_ss:        dq 0
sc_user_rsp:    dq 0
sc_rax:         dq 0
sc_rcx:         dq 0
sc_r11:         dq 0
sc_rflags:      dq 0
sc_cs:          dq 0
sc_ss:          dq 0
i80_rip:        dq 0
i80_cs:         dq 0
i80_rsp:        dq 0
i80_ss:         dq 0
i80_frame:      dq 0
irq_seen:       dq 0
irq_rip:        dq 0
irq_cs:         dq 0
irq_rsp:        dq 0
irq_ss:         dq 0
irq_frame:      dq 0
ex_records:     times MAX_RECORDS * REC_SIZE db 0

        USE_BITS 16
%include "print.inc"
%include "pc.inc"
        USE_BITS 64
%include "print.inc"
%include "pc.inc"
%include "end.inc"
