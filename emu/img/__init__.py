"""``emu-img``: qemu-img's command line on emu's block layer.

Map of the package:

- :mod:`emu.img.main` — entry point, ``@command`` registry, option parsing and qemu-img's
  error conventions (``emu-img: <msg>``, "Try ... --help", exit codes), ``--help``.
- :mod:`emu.img.commands` — ``check`` (on :mod:`emu.block.qcow2.check`); imports the others.
- :mod:`emu.img.cmd_image` — ``create``, ``info``, ``snapshot``, ``map``, ``resize``, ``commit``,
  ``rebase``; the ``Formatting ...`` line, ``-o`` parsing, the human info/snapshot layouts,
  chain-aware block status and the progress printer.
- :mod:`emu.img.cmd_copy` — ``convert``, ``compare``, ``bench``.
- :mod:`emu.img.imgopen` — one :class:`~emu.block.node.BlockGraph` per run, "Could not open"
  texts, backing-chain walking.
- :mod:`emu.img.output` — JSON in QEMU's QDict member order, ``size_to_str``, snapshot rows.
- :mod:`emu.img.util` — size suffixes (``qemu_strtosz``), format probing, ``--output`` checks.

Every text, JSON member order and exit code is qemu-img 7.2's; ``tests/golden/img`` runs both
tools side by side to keep it so.
"""
