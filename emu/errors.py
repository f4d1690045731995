"""The one error tree of emu.

::

    EmuError
     +-- ConfigError        bad command line / machine configuration (QEMU's message, exit 1)
     +-- BlockError         block layer failures (carries QEMU's text)
     |    +-- ImageFormatError   an image that is corrupt or uses unsupported features
     |    +-- ImageOpenError     a file that cannot be opened / locked
     +-- QmpError           a QMP error reply: QEMU's error class and exact ``desc``
     +-- CpuError           vCPU set-up failures (e.g. an unexpected Unicorn build)

Layers derive their own subclasses from these and wrap causes with
``raise XError(...) from err``.  A guest fault is never an exception: devices
turn it into device status.
"""

from __future__ import annotations


class EmuError(Exception):
    """Base of every error emu raises on purpose."""


class ConfigError(EmuError):
    """A command-line or configuration error; ``str()`` is QEMU's message."""


class BlockError(EmuError):
    """A block-layer error; ``str()`` is the text QEMU gives for the same failure."""


class ImageFormatError(BlockError):
    """An image is corrupt, hostile, or uses a feature emu refuses."""


class ImageOpenError(BlockError):
    """An image file cannot be opened, created or locked."""


class QmpError(EmuError):
    """A QMP error reply.

    :param cls: QEMU's error class, e.g. ``"GenericError"``, ``"CommandNotFound"``,
        ``"DeviceNotActive"``, ``"DeviceNotFound"``.
    :param desc: QEMU's exact human-readable text.
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class CpuError(EmuError):
    """The CPU engine cannot be set up as emu needs it."""
