"""PCI: host bridge, chipset functions, and the helpers device functions build on.

* :mod:`.device` — :class:`~emu.hw.pci.device.PciFunction`: config space with write masks,
  BARs (sizing, mapping on the I/O / MMIO bus, remapping), capabilities, INTx.
* :mod:`.host` — :class:`~emu.hw.pci.host.PciHost`: configuration mechanism #1 at 0xCF8/0xCFC, bus 0.
* :mod:`.chipset` — i440FX host bridge (00:00.0), PIIX3 ISA bridge (00:01.0) with PIRQ routing
  and the 0xCF9 reset control register.
* :mod:`.setup` — assigns BARs, IRQ lines and PIRQ routes as SeaBIOS does, for firmware-less boots.
"""
