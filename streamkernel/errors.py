"""Exception classes and the wire shape of an error."""
from __future__ import annotations

import sys
import traceback
from types import TracebackType
from typing import Any

from . import protocol


class StreamKernelError(Exception):
    """Base class of every error streamkernel raises."""


class MessageError(StreamKernelError):
    """A message that must be dropped: it is never unpacked further nor run."""


class UnsignedMessage(MessageError):
    """A message without a signature reached a session that has a key."""


class InvalidSignature(MessageError):
    """The signature does not match header, parent header and content."""


class DuplicateSignature(MessageError):
    """The signature was seen before: a replayed message."""


class MalformedMessage(MessageError):
    """The frames do not form a message (no delimiter, too few frames, bad JSON...)."""


class SerializationError(StreamKernelError):
    """An apply payload or a result could not be (un)serialized."""


class ConfigError(StreamKernelError):
    """The engine's configuration is missing, unreadable or invalid."""


class RegistrationError(StreamKernelError):
    """The hub refused or did not answer the registration."""


class UnmetDependency(StreamKernelError):
    """Raised by a task whose dependencies are not met (the reply says dependencies_met false)."""


class ImpossibleDependency(UnmetDependency):
    """Raised by a task whose dependencies can never be met."""


_MAX_TRACEBACK_LINES = 1000
_MAX_TEXT = 100_000


def _safe_str(value: BaseException) -> str:
    try:
        text = str(value)
    except BaseException as e:  # a broken __str__ must not break the reply
        text = "<unprintable %s object: %s>" % (type(value).__name__, type(e).__name__)
    return text[:_MAX_TEXT]


def format_traceback(
    etype: type[BaseException], evalue: BaseException, tb: TracebackType | None
) -> list[str]:
    """Return the traceback as a list of strings, bounded in length, never raising."""
    try:
        lines = traceback.format_exception(etype, evalue, tb)
    except BaseException:
        lines = ["Traceback (most recent call last):\n", "  <traceback could not be formatted>\n",
                 "%s: %s\n" % (etype.__name__, _safe_str(evalue))]
    if len(lines) > _MAX_TRACEBACK_LINES:
        half = _MAX_TRACEBACK_LINES // 2
        skipped = len(lines) - 2 * half
        lines = lines[:half] + ["  ... %d lines skipped ...\n" % skipped] + lines[-half:]
    return [line[:_MAX_TEXT] for line in lines]


def error_content(engine_info: dict[str, Any] | None = None,
                  exc_info: tuple[Any, Any, Any] | None = None) -> dict[str, Any]:
    """Return the reply content for the exception being handled (or ``exc_info``)."""
    etype, evalue, tb = exc_info or sys.exc_info()
    if etype is None or evalue is None:
        raise ValueError("error_content() called without an exception")
    return {
        protocol.STATUS: protocol.ERROR,
        "traceback": format_traceback(etype, evalue, tb),
        "ename": etype.__name__,
        "evalue": _safe_str(evalue),
        "engine_info": dict(engine_info or {}),
    }


__all__ = [
    "StreamKernelError", "MessageError", "UnsignedMessage", "InvalidSignature",
    "DuplicateSignature", "MalformedMessage", "SerializationError", "ConfigError",
    "RegistrationError", "UnmetDependency", "ImpossibleDependency",
    "format_traceback", "error_content",
]
