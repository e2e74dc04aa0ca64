"""One structlog configuration for every service, with secret redaction on the way out.

Invariant 4 says TPM/NVRAM bytes, keys and passphrases never reach a log line in any
form. Every event, from structlog or from stdlib loggers (aio-pika, aiormq, redis), has
its exception rendered without local variables and then `redact_secrets` run over all of
it, that exception text included, before one `ProcessorFormatter` serialises it.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

import structlog
from pydantic import Secret, SecretBytes, SecretStr
from structlog.typing import EventDict, Processor, WrappedLogger

_HANDLER_NAME: Final = "keeper_shared.runtime.logging"
_MAX_DEPTH: Final = 8

# Substrings of a field name that mark its value as secret.
_SECRET_NAME_PARTS: Final = (
    "secret",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "key",
    "dek",
    "kek",
    "token",
    "blob",
    "data",
    "content",
    "payload",
    "body",
)
# Substrings that make a field name safe even if it also matches the list above: hashes
# identify content without revealing it, and ids and routing keys are names.
_ALLOWED_NAME_PARTS: Final = ("hash", "sha256", "digest", "fencing")
_ALLOWED_NAME_SUFFIXES: Final = ("_id", "routing_key")
# Fields that structlog or ProcessorFormatter own; their values are not log content.
_PASSTHROUGH_FIELDS: Final = frozenset({"_record", "_from_structlog"})

# A bytes repr (`b'\x8f...'`, also inside `bytearray(...)` or an exception message). An
# unterminated literal (cut off by a truncating formatter) is redacted to the line end.
_BYTES_LITERAL = re.compile(
    r"""(?<![A-Za-z0-9_])b(?:'(?:[^'\\\n]|\\.)*(?:'|$)|"(?:[^"\\\n]|\\.)*(?:"|$))""",
    re.MULTILINE,
)
# The password of a URL (redis://keeper-store:<password>@host/0, amqp://…): the user and
# the address stay readable.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@/]*@")
# Longer than a SHA-256 hex digest (64), so hashes stay readable.
_LONG_HEX = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{65,}(?![0-9A-Fa-f])")
_LONG_BASE64 = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{65,}={0,2}")
# Padded base64 of >= 16 bytes: a base64'd AES key is 24 or 44 chars, under the 64 limit.
_PADDED_BASE64 = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{22,}={1,2}(?![A-Za-z0-9+/_=-])")


def _mask_bytes_literal(match: re.Match[str]) -> str:
    literal = match.group(0)
    try:
        value = ast.literal_eval(literal)
    except (SyntaxError, ValueError):
        return "<redacted bytes>"
    return f"<redacted {len(value)} bytes>" if isinstance(value, bytes) else "<redacted bytes>"


def _mask_long_base64(match: re.Match[str]) -> str:
    run = match.group(0)
    # Random base64 this long mixes upper, lower and digits with near certainty, and uses
    # one alphabet (`+/` or `-_`), never both. Paths and identifiers usually fail one of
    # those tests (all lowercase, no digits, or `/` next to `-`/`_`) and stay readable.
    looks_encoded = (
        any(c.isupper() for c in run)
        and any(c.islower() for c in run)
        and any(c.isdigit() for c in run)
        and not (any(c in "+/" for c in run) and any(c in "-_" for c in run))
    )
    return f"<redacted {len(run)} chars>" if looks_encoded else run


def _mask_padded_base64(match: re.Match[str]) -> str:
    token = match.group(0)
    return f"<redacted {len(token)} chars>" if len(token) % 4 == 0 else token


def _redact_text(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\g<1><redacted>@", text)
    text = _BYTES_LITERAL.sub(_mask_bytes_literal, text)
    text = _LONG_HEX.sub(lambda m: f"<redacted {len(m.group(0))} chars>", text)
    text = _LONG_BASE64.sub(_mask_long_base64, text)
    return _PADDED_BASE64.sub(_mask_padded_base64, text)


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    if lowered.endswith(_ALLOWED_NAME_SUFFIXES):
        return False
    if any(part in lowered for part in _ALLOWED_NAME_PARTS):
        return False
    return any(part in lowered for part in _SECRET_NAME_PARTS)


def _redaction_marker(value: object) -> object:
    """What a value under a secret-named field becomes."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray):
        return f"<redacted {len(value)} bytes>"
    if isinstance(value, memoryview):
        return f"<redacted {value.nbytes} bytes>"
    if isinstance(value, SecretBytes):
        return f"<redacted {len(value.get_secret_value())} bytes>"
    if isinstance(value, str):
        return f"<redacted {len(value)} chars>"
    return "<redacted>"


def _redact_value(value: object, depth: int) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, bytes | bytearray | memoryview | SecretBytes):
        return _redaction_marker(value)
    if isinstance(value, SecretStr | Secret):
        # Not even the length: it says too much about a passphrase.
        return "<redacted>"
    if depth >= _MAX_DEPTH:
        return "<redacted: nested too deep>"
    if isinstance(value, Mapping):
        walked: dict[str, object] = {}
        for key, item in value.items():
            name = _redact_key(key)
            walked[name] = _redact_field(name, item, depth + 1)
        return walked
    if isinstance(value, list | set | frozenset):
        return [_redact_value(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact_value(item, depth + 1) for item in value)
    # Renderers would repr() anything else anyway (a model, a dataclass, an exception);
    # doing it here lets the text rules see bytes or encoded blobs inside that repr.
    return _redact_text(repr(value))


def _redact_key(key: object) -> str:
    return _redact_text(key) if isinstance(key, str) else str(_redact_value(key, _MAX_DEPTH))


def _redact_field(name: str, value: object, depth: int) -> object:
    if _is_secret_name(name):
        return _redaction_marker(value)
    return _redact_value(value, depth)


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Structlog processor that removes secrets from an event before it is rendered.

    Rules, applied to every value and recursively inside dicts, lists, tuples and sets:

    - ``bytes``, ``bytearray``, ``memoryview`` and ``pydantic.SecretBytes`` become
      ``<redacted N bytes>``; ``SecretStr`` and ``Secret`` become ``<redacted>``.
    - A field whose name contains ``secret``, ``password``, ``passwd``, ``passphrase``,
      ``credential``, ``key``, ``dek``, ``kek``, ``token``, ``blob``, ``data``,
      ``content``, ``payload`` or ``body`` (case-insensitive) is replaced whatever it
      holds, unless the value is ``None``, a bool, an int or a float (sizes, counts). Names
      ending in ``_id`` or ``routing_key``, or containing ``hash``, ``sha256``, ``digest``
      or ``fencing`` are exempt (``key_id``, ``content_hash``, ``fencing_token``).
    - In every string, including the event message and the rendered exception text:
      a Python bytes repr (``b'...'``) is replaced; a hex run longer than 64 chars is
      replaced; a base64 or base64url run longer than 64 chars that mixes upper case,
      lower case and digits and keeps to one of the two alphabets is replaced; a padded
      base64 token of 24+ chars (a base64'd 16- or 32-byte key) is replaced. A 64-char
      SHA-256 hex digest therefore stays visible, and so do long paths.
    - Any other object is turned into its ``repr()`` and that text is checked as above.

    Known limit: a 32-byte key written out as 64 hex chars looks exactly like a SHA-256
    digest, so it is caught only by a secret field name. Key objects in
    `keeper_state_store.crypto.encryption` never render their bytes; keep keys in them.

    Must run after exceptions are formatted (so their text is checked) and before the
    renderer. ``exc_info`` is left alone unless it is already text.
    """
    redacted: EventDict = {}
    for key, value in event_dict.items():
        if key in _PASSTHROUGH_FIELDS or (key == "exc_info" and not isinstance(value, str)):
            redacted[key] = value
        else:
            redacted[key] = _redact_field(key, value, 0)
    return redacted


class _RedactedExceptionLogger(structlog.stdlib.BoundLogger):
    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at error level with the current exception, rendered and redacted."""
        kw.setdefault("exc_info", True)
        # Not the stdlib's Logger.exception: it would attach the raw exception to the
        # LogRecord, and any other handler (pytest's log capture, say) would print that
        # unredacted. The processors have already rendered it into the event.
        return self._proxy_to_logger("error", event, *args, **kw)


def _level_number(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    try:
        return levels[level.upper()]
    except KeyError:
        msg = f"unknown log level {level!r}; expected one of DEBUG, INFO, WARNING, ERROR"
        raise ValueError(msg) from None


def configure_logging(
    service: str, *, json_output: bool | None = None, level: str = "INFO"
) -> None:
    """Configure structlog and stdlib logging for ``service``, writing to stderr.

    Every line carries ``service``, ``level``, ``logger`` and a UTC ISO ``timestamp`` plus
    any context bound with `structlog.contextvars.bind_contextvars`. Output is JSON when
    ``json_output`` is true, or when it is None and stderr is not a terminal; otherwise
    the console format (colours only on a terminal). Stdlib loggers go through the same
    processors via `structlog.stdlib.ProcessorFormatter`. Tracebacks are rendered without
    local variables and then redacted (see `redact_secrets`). Uncaught exceptions are
    logged through the same pipeline instead of Python's default hook, which would print
    them unredacted.

    Calling it again replaces the previous configuration instead of adding a handler.
    """
    level_number = _level_number(level)
    stream = sys.stderr
    is_tty = stream.isatty()
    if json_output is None:
        json_output = not is_tty

    def add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    shared_processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
    ]
    exception_renderer: Processor
    renderer: Processor
    if json_output:
        # dict_tracebacks would default to show_locals=True, and locals hold the very
        # blobs and keys a handler was working on.
        exception_renderer = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False, use_rich=False)
        )
        renderer = structlog.processors.JSONRenderer()
    else:
        # A plain text traceback made before redaction; the renderer's own rich or
        # better-exceptions formatting would print locals and run after redaction.
        exception_renderer = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(
            colors=is_tty, exception_formatter=structlog.dev.plain_traceback
        )

    # Exceptions are rendered and secrets redacted before an event leaves structlog, so
    # any other stdlib handler on the root logger (pytest's log capture, say) also gets
    # only the redacted event. Foreign records get the same two steps in the pre-chain.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors,
            structlog.processors.StackInfoRenderer(),
            exception_renderer,
            redact_secrets,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=_RedactedExceptionLogger,
        # Not cached: tests reconfigure, and loggers made at import time must follow.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared_processors, exception_renderer, redact_secrets],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_number)

    uncaught_logger = structlog.stdlib.get_logger(service)

    def log_uncaught_exception(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        uncaught_logger.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    sys.excepthook = log_uncaught_exception
