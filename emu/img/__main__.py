"""``python -m emu.img``: the same as the ``emu-img`` console script."""

from emu.img.main import main

main()
