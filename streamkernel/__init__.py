"""streamkernel: a Python 3 engine kernel for IPython 0.11-style distributed Python."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import EngineConfig, disambiguate_url
from .errors import (ConfigError, MessageError, SerializationError, StreamKernelError,
                     UnmetDependency)
from .kernel import Kernel
from .serialize import (interactive, pack_apply_message, serialize_object, unpack_apply_message,
                        unserialize_object)
from .session import Session
from .stream import KernelStream

__all__ = [
    "__version__", "EngineConfig", "disambiguate_url", "Kernel", "KernelStream", "Session",
    "StreamKernelError", "MessageError", "SerializationError", "ConfigError",
    "UnmetDependency", "interactive", "pack_apply_message", "unpack_apply_message",
    "serialize_object", "unserialize_object",
]
