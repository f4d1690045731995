; bench - CPU loops timed inside the guest, for scripts/bench-cpu (long mode, CPL0).
;
; Each loop runs SCALE times its base count and prints one line
;     bench <loop>: iters=<n> insns=<n> bytes=<n> tsc=<cycles> ms=<PIT milliseconds>
; where ms counts IRQ 0 at 1 kHz and tsc is RDTSC's difference.  Then IRQ delivery cost (the
; ALU loop with IRQ 0 masked, then taking it: tsc_masked, tsc_irqs, irqs), IRQ latency: IRQ_SAMPLES
; ticks taken from HLT, each handler latching the PIT count to see how long after the
; terminal count it ran (units of 1/1193182 s), and a HLT phase of HALT_MS milliseconds
; between "bench halt: start" and "bench halt: ... done" for measuring the host's CPU use (that
; line's tsc/ms is the TSC rate measured while the guest is idle, to calibrate the loops' tsc).
;
; The parameters sit at image offset 512 (the first payload sector): the 8-byte magic
; "EMUBENCH", then SCALE and HALT_MS as little-endian dwords.  scripts/bench-cpu patches a
; copy of the image; the committed values are the small ones the tests use.

%include "boot.inc"

SEL_CODE0       equ 0x08
SEL_DATA0       equ 0x10
VEC_MASTER      equ 0x20
VEC_SLAVE       equ 0x28
PML4            equ 0x1000
PDPT            equ 0x2000
PD              equ 0x3000
IDT_BASE        equ 0x11000
KSTACK          equ 0x28000
LS_BUFFER       equ 0x50000         ; 4 KiB for the load/store loop
COPY_SRC        equ 0x400000        ; 1 MiB each; bit 20 clear, so A20 does not matter
COPY_DST        equ 0x600000
COPY_BYTES      equ 1 << 20

ALU_ITERS       equ 10000000        ; base counts, times SCALE
LS_ITERS        equ 4000000
CALL_ITERS      equ 4000000
COPY_REPS       equ 8
IRQ_SAMPLES     equ 200

bench_params:                           ; image offset 512: patched by scripts/bench-cpu
        db "EMUBENCH"
param_scale:    dd 1
param_halt_ms:  dd 200

        USE_BITS 16
main:
        PUTLN "emu-guest cpu/bench start"
        cli
        mov bx, (VEC_SLAVE << 8) | VEC_MASTER
        call pic_init16
        xor eax, eax
        mov di, PML4
        mov cx, 3 * 4096 / 4
        rep stosd
        mov dword [PML4], PDPT | 0x003
        mov dword [PDPT], PD | 0x003
        mov dword [PD + 0 * 8], 0x000000 | 0x083          ; 0-8 MiB, 2 MiB pages
        mov dword [PD + 1 * 8], 0x200000 | 0x083
        mov dword [PD + 2 * 8], 0x400000 | 0x083
        mov dword [PD + 3 * 8], 0x600000 | 0x083
        lgdt [gdt_desc]
        mov eax, cr4
        or eax, 1 << 5                  ; PAE
        mov cr4, eax
        mov eax, PML4
        mov cr3, eax
        mov ecx, 0xC0000080             ; EFER.LME
        rdmsr
        or eax, 1 << 8
        wrmsr
        mov eax, cr0
        or eax, 0x80000001
        mov cr0, eax
        jmp SEL_CODE0:lm_entry

        USE_BITS 64
lm_entry:
        mov ax, SEL_DATA0
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, KSTACK
        xor ecx, ecx                    ; every vector: fatal, except IRQ 0
.idt:
        mov rax, unexpected
        cmp ecx, VEC_MASTER
        jne .gate
        mov rax, irq0_entry
.gate:
        mov rdi, rcx
        shl rdi, 4
        add rdi, IDT_BASE
        mov [rdi], ax
        mov word [rdi + 2], SEL_CODE0
        mov word [rdi + 4], 0x8E00
        shr rax, 16
        mov [rdi + 6], ax
        shr rax, 16
        mov [rdi + 8], eax
        mov dword [rdi + 12], 0
        inc ecx
        cmp ecx, 256
        jb .idt
        lidt [idt_desc]

        mov ecx, PIT_1KHZ
        call pit_start64
        mov al, 0xFE
        out PIC1_DATA, al
        sti

        TEST "params"
        mov eax, [param_scale]
        SHOWDEC "scale", rax
        mov eax, [param_halt_ms]
        SHOWDEC "halt_ms", rax
        ENDTEST

        ; ALU: 5 instructions per iteration, registers only.
        mov r12d, ALU_ITERS
        mov eax, [param_scale]
        imul r12, rax
        call start_timer
        mov rcx, r12
        mov rax, 1
        mov rbx, 3
.alu:
        add rax, rbx
        xor rbx, rcx
        rol rax, 3
        dec rcx
        jnz .alu
        mov r13, 5
        xor r14, r14
        LSTR rsi, "alu"
        call report

        ; Load/store: 7 instructions, one 8-byte load and one store to a 4 KiB buffer.
        mov r12d, LS_ITERS
        mov eax, [param_scale]
        imul r12, rax
        call start_timer
        mov rcx, r12
        mov rsi, LS_BUFFER
        xor edx, edx
.ls:
        mov rax, [rsi + rdx * 8]
        add rax, rcx
        mov [rsi + rdx * 8], rax
        inc edx
        and edx, 511
        dec rcx
        jnz .ls
        mov r13, 7
        xor r14, r14
        LSTR rsi, "loadstore"
        call report

        ; call/ret: 5 instructions (call, add, ret, dec, jnz).
        mov r12d, CALL_ITERS
        mov eax, [param_scale]
        imul r12, rax
        call start_timer
        mov rcx, r12
        xor eax, eax
.call:
        call leaf
        dec rcx
        jnz .call
        mov r13, 5
        xor r14, r14
        LSTR rsi, "callret"
        call report

        ; memcpy: 1 MiB with REP MOVSQ, COPY_REPS times SCALE.
        mov r12d, COPY_REPS
        mov eax, [param_scale]
        imul r12, rax
        call start_timer
        mov r8, r12
.copy:
        mov rsi, COPY_SRC
        mov rdi, COPY_DST
        mov ecx, COPY_BYTES / 8
        rep movsq
        dec r8
        jnz .copy
        xor r13, r13                    ; instruction count not meaningful: report bytes
        mov r14, r12
        shl r14, 20
        LSTR rsi, "memcpy"
        call report

        ; IRQ delivery cost: the ALU loop once with IRQ 0 masked and once taking it at 1 kHz;
        ; (tsc_irqs - tsc_masked) / irqs is what one delivery + handler + IRET costs.
        mov r12d, ALU_ITERS
        mov eax, [param_scale]
        imul r12, rax
        mov al, 0xFF
        out PIC1_DATA, al
        call alu_timed
        mov r13, rax                    ; TSC, masked
        mov al, 0xFE
        out PIC1_DATA, al
        mov r15, [ms]
        call alu_timed
        mov r14, rax                    ; TSC, taking IRQs
        mov rbx, [ms]
        sub rbx, r15
        TEST "bench irqcost"
        SHOWDEC "iters", r12
        SHOWDEC "tsc_masked", r13
        SHOWDEC "tsc_irqs", r14
        SHOWDEC "irqs", rbx
        ENDTEST

        ; IRQ latency from HLT: the handler latches the PIT count of the tick it serves.
        cli
        mov qword [lat_sum], 0
        mov qword [lat_max], 0
        mov qword [lat_n], 0
        mov byte [lat_on], 1
        sti
.lat:
        hlt
        cmp qword [lat_n], IRQ_SAMPLES
        jb .lat
        cli
        mov byte [lat_on], 0
        TEST "bench irq"
        SHOWDEC "n", qword [lat_n]
        mov rax, [lat_sum]
        xor edx, edx
        mov rcx, [lat_n]
        div rcx
        SHOWDEC "latency_avg_pit", rax
        SHOWDEC "latency_max_pit", qword [lat_max]
        ENDTEST

        ; HLT phase: the host measures its CPU use between these two lines.
        PUTLN "bench halt: start"
        call start_timer
        mov rbx, [ms]
        mov eax, [param_halt_ms]
        add rbx, rax
        sti
.halt:
        hlt
        cmp [ms], rbx
        jb .halt
        cli
        rdtsc
        shl rdx, 32
        or rax, rdx
        sub rax, [t_tsc]
        mov r15, rax
        mov rbx, [ms]
        sub rbx, [t_ms]
        TEST "bench halt"
        SHOWDEC "ms", rbx
        SHOWDEC "tsc", r15              ; TSC rate against the PIT, while nothing else runs
        PUTS " done"
        ENDTEST
        FINISH

leaf:
        add rax, 1
        ret

; alu_timed: the ALU loop R12 times; RAX = TSC cycles it took.
alu_timed:
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov r8, rax
        mov rcx, r12
        mov rax, 1
        mov rbx, 3
.loop:
        add rax, rbx
        xor rbx, rcx
        rol rax, 3
        dec rcx
        jnz .loop
        rdtsc
        shl rdx, 32
        or rax, rdx
        sub rax, r8
        ret

; start_timer: note RDTSC and the millisecond count.
start_timer:
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov [t_tsc], rax
        mov rax, [ms]
        mov [t_ms], rax
        ret

; report: RSI = loop name, R12 = iterations, R13 = instructions per iteration, R14 = bytes.
report:
        rdtsc
        shl rdx, 32
        or rax, rdx
        sub rax, [t_tsc]
        mov r15, rax
        mov rbx, [ms]
        sub rbx, [t_ms]
        push rsi
        PUTS "bench "
        pop rsi
        call test_begin64
        SHOWDEC "iters", r12
        mov rax, r12
        imul rax, r13
        SHOWDEC "insns", rax
        SHOWDEC "bytes", r14
        SHOWDEC "tsc", r15
        SHOWDEC "ms", rbx
        ENDTEST
        ret

irq0_entry:
        push rax
        push rdx
        inc qword [ms]
        cmp byte [lat_on], 0
        je .eoi
        xor eax, eax
        out PIT_MODE, al                ; latch channel 0
        in al, PIT_CH0
        mov dl, al
        in al, PIT_CH0
        mov ah, al
        mov al, dl
        movzx edx, ax
        mov eax, PIT_1KHZ
        sub eax, edx                    ; PIT ticks since the count reloaded
        add [lat_sum], rax
        cmp rax, [lat_max]
        jbe .counted
        mov [lat_max], rax
.counted:
        inc qword [lat_n]
.eoi:
        mov al, OCW2_EOI
        out PIC1_CMD, al
        pop rdx
        pop rax
        iretq

unexpected:
        FATAL "unexpected exception or interrupt"

        align 8
gdt:
        dq 0
        dq 0x00AF9A000000FFFF           ; 0x08 code64
        dq 0x00CF92000000FFFF           ; 0x10 data
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd gdt
idt_desc:
        dw 256 * 16 - 1
        dq IDT_BASE
        align 8
ms:             dq 0
t_tsc:          dq 0
t_ms:           dq 0
lat_sum:        dq 0
lat_max:        dq 0
lat_n:          dq 0
lat_on:         db 0

        USE_BITS 16
%include "print.inc"
%include "pc.inc"
        USE_BITS 64
%include "print.inc"
%include "pc.inc"
%include "end.inc"
