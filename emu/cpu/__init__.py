"""The vCPU: an x86-64 processor on Unicorn 2.1.4, driven like a PC's CPU.

Unicorn executes guest code but has no interrupt controller, never delivers an
interrupt or exception through the guest's IVT/IDT and only *reports* SYSCALL and
SYSENTER.  This package supplies the rest, the way the hardware does it.

Which module owns what:

``uclib``       the one import point for Unicorn (stock or patched library; not ours)
``layout``      the CPUX86State fields we read and write through the context blob, their
                offsets in the pinned build, and the start-up check that refuses another build;
                the uc_struct flag that keeps stops at instruction boundaries
``mmu``         guest physical memory access and the linear->physical page walk used
                while delivering events (IDT/GDT/TSS reads, stack pushes, #PF on failure);
                ``WalkCache`` keeps walks between events, each re-checked before use
``interrupts``  delivery of IRQs, INT n, exceptions (real-mode IVT, 32-bit IDT, 64-bit IDT,
                TSS stack switch, IST, #DF / triple fault) and SYSCALL / SYSENTER
``features``    CPUID as we implement it, the MSRs we emulate, the virtual TSC
``vcpu``        :class:`~emu.cpu.vcpu.VCPU`: memory map, hooks, the vCPU thread and its run
                loop, pause/resume/reset/stop, A20, code invalidation after DMA

Threads: one thread (the vCPU thread) makes every Unicorn call; other threads talk to
it through :meth:`VCPU.kick`, :meth:`VCPU.pause`, :meth:`VCPU.resume`,
:meth:`VCPU.reset`, :meth:`VCPU.stop`, which only set flags, call ``emu_stop`` and wait.

Use from the machine::

    cpu = VCPU(ram_size, iobus.port_read, iobus.port_write, pic,
               on_reset_request=..., clock_ns=clock.now)
    cpu.load_rom(0x100000000 - len(bios), bios)      # + alias below 1 MiB
    cpu.map_mmio(base, size, read, write)            # BARs; unmap_mmio() to move them
    board.connect_cpu(cpu.interrupt_raised)          # INTR rose: take it (natively)
    cpu.start(); cpu.pause(); cpu.resume(); cpu.reset(); cpu.stop()
    view = cpu.dma_view(gpa, n); ...; cpu.invalidate_code(gpa, n)   # device DMA

Behaviour that differs from QEMU, and why, is written where it is implemented: IRQs behind
IF=0 taken within ~0.5 ms (vcpu.py), ROM stores undone rather than dropped (vcpu.py), task
gates not implemented (interrupts.py).
"""
