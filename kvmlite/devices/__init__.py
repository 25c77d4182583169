"""Port-I/O devices.  Each sees offsets from its own base, never absolute ports
(as in kvmtool), and can save and restore its state for migration."""

from .bus import Device, IoBus
from .uart import Uart16550
from .debugcon import DebugCon
from .exitdev import ExitDevice, GuestExit, IdleDevice
from .fph import FreePageHint

__all__ = ["Device", "IoBus", "Uart16550", "DebugCon", "ExitDevice", "GuestExit", "IdleDevice", "FreePageHint"]
