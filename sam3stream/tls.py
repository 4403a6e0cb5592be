"""The client TLS context for a broker connection, built from PEM files.

The config check builds it once to report an unusable file at its key; the MQTT sink builds it
again for each connection, so that a renewed certificate is used from the next reconnect on.
"""

from __future__ import annotations

import ssl

__all__ = ["TlsFileError", "client_context"]


class TlsFileError(Exception):
    """A TLS file that cannot be used; ``key`` is its config key (``ca_file``, ``cert_file``...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would prompt for an encrypted key's passphrase on the terminal,
    # hanging a service (or a config check) that nobody is watching.
    raise _EncryptedKeyError


def client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    *,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A context that verifies the broker against ``ca_file`` (None: the system's CAs) and, with
    ``cert_file``, authenticates us by certificate (the key in ``key_file`` or in ``cert_file``).
    ``insecure`` skips the hostname check: the certificate is still verified, not its name.

    Raises TlsFileError naming the key of the first file that cannot be read or loaded.
    """
    for key, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path is not None:
            _check_readable(key, path)
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TlsFileError("ca_file", f"{ca_file} holds no PEM certificate to trust{_reason(exc)}") from None
    if cert_file is not None:
        _load_cert_chain(context, cert_file, key_file)
    elif key_file is not None:
        raise TlsFileError("key_file", "a key without cert_file: give the client certificate too")
    if insecure:
        context.check_hostname = False
    return context


def _check_readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise TlsFileError(key, f"{path} does not exist") from None
    except IsADirectoryError:
        raise TlsFileError(key, f"{path} is a folder, not a PEM file") from None
    except OSError as exc:
        raise TlsFileError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _load_cert_chain(context: ssl.SSLContext, cert_file: str, key_file: str | None) -> None:
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
        return
    except _EncryptedKeyError:
        key, where = ("key_file", key_file) if key_file else ("cert_file", cert_file)
        raise TlsFileError(key, f"the private key in {where} is encrypted: give an unencrypted key") from None
    except ssl.SSLError as exc:
        failure = exc
    # OpenSSL's "PEM lib" says little; tell the certificate from the key by loading the
    # certificate alone (a certificate file read as a CA bundle skips any key in it).
    try:
        ssl.create_default_context(cafile=cert_file)
    except ssl.SSLError:
        raise TlsFileError("cert_file", f"{cert_file} holds no PEM certificate{_reason(failure)}") from None
    if key_file is None:
        why = "holds no matching PEM private key: put the key in it or give key_file"
        raise TlsFileError("cert_file", f"{cert_file} {why}{_reason(failure)}")
    why = "is not a PEM private key matching cert_file"
    raise TlsFileError("key_file", f"{key_file} {why}{_reason(failure)}")


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code (KEY_VALUES_MISMATCH), when it gives one; not "[SSL] PEM lib"."""
    return f" ({exc.reason})" if isinstance(exc.reason, str) and exc.reason else ""
