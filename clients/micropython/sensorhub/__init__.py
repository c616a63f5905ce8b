"""sensor-hub client for MicroPython boards (and CPython): `HubClient`, `Clock`.

Copy this folder to the board's /lib; see clients/micropython/README.md.
"""

from .client import HubClient
from .clock import Clock

__all__ = ["Clock", "HubClient"]
__version__ = "0.1.0"
