"""client_context: PEM files from a throw-away CA (trustme); a bad file is named by its config key."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from sam3stream.tls import TlsFileError, client_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("client@example.org")


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def tls_error(*args: str | None, insecure: bool = False) -> TlsFileError:
    with pytest.raises(TlsFileError) as info:
        client_context(*args, insecure=insecure)
    return info.value


def test_a_good_ca_gives_a_context_that_verifies_the_broker_and_its_name(
    tmp_path: Path, ca: trustme.CA
) -> None:
    context = client_context(write(tmp_path / "ca.pem", ca.cert_pem.bytes()))
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    # Our CA is the one trusted: a context without it would not verify a broker it signed.
    assert len(context.get_ca_certs()) == 1


def test_insecure_skips_the_name_check_but_still_verifies_the_certificate(
    tmp_path: Path, ca: trustme.CA
) -> None:
    context = client_context(write(tmp_path / "ca.pem", ca.cert_pem.bytes()), insecure=True)
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_a_missing_file_is_named_at_its_key(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    error = tls_error(missing)
    assert error.key == "ca_file"
    assert error.message == f"{missing} does not exist"
    assert str(error) == f"ca_file: {missing} does not exist"


def test_a_missing_key_file_is_named_at_key_file(tmp_path: Path, client: trustme.LeafCert) -> None:
    cert = write(tmp_path / "client.pem", client.cert_chain_pems[0].bytes())
    error = tls_error(None, cert, str(tmp_path / "nope.key"))
    assert error.key == "key_file" and "does not exist" in error.message


def test_a_folder_is_not_a_pem_file(tmp_path: Path) -> None:
    error = tls_error(None, str(tmp_path))
    assert error.key == "cert_file"
    assert error.message == f"{tmp_path} is a folder, not a PEM file"


@pytest.mark.parametrize("content", [b"not a certificate\n", b""], ids=["text", "empty"])
def test_a_ca_file_that_is_not_pem(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "ca.pem", content)
    error = tls_error(path)
    assert error.key == "ca_file"
    assert error.message.startswith(f"{path} holds no PEM certificate to trust")
    assert "NO_CERTIFICATE_OR_CRL_FOUND" in error.message  # OpenSSL's reason, for the curious


def test_a_ca_file_holding_only_a_key_has_no_certificate(tmp_path: Path, client: trustme.LeafCert) -> None:
    path = write(tmp_path / "ca.pem", client.private_key_pem.bytes())
    error = tls_error(path)
    assert error.key == "ca_file" and "holds no PEM certificate to trust" in error.message


def test_a_client_certificate_with_its_key_in_a_separate_file(
    tmp_path: Path, ca: trustme.CA, client: trustme.LeafCert
) -> None:
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem.bytes())
    cert = write(tmp_path / "client.pem", client.cert_chain_pems[0].bytes())
    key = write(tmp_path / "client.key", client.private_key_pem.bytes())
    context = client_context(ca_file, cert, key)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True


def test_a_client_certificate_with_its_key_in_the_same_file(tmp_path: Path, client: trustme.LeafCert) -> None:
    both = write(tmp_path / "client.pem", client.private_key_and_cert_chain_pem.bytes())
    assert isinstance(client_context(None, both), ssl.SSLContext)


def test_a_certificate_without_its_key(tmp_path: Path, client: trustme.LeafCert) -> None:
    cert = write(tmp_path / "client.pem", client.cert_chain_pems[0].bytes())
    error = tls_error(None, cert)
    assert error.key == "cert_file"
    assert error.message.startswith(f"{cert} holds no matching PEM private key")
    assert "give key_file" in error.message


def test_a_cert_file_that_is_not_pem(tmp_path: Path, client: trustme.LeafCert) -> None:
    cert = write(tmp_path / "client.pem", b"garbage\n")
    key = write(tmp_path / "client.key", client.private_key_pem.bytes())
    error = tls_error(None, cert, key)
    # The key is fine: the blame goes to the certificate, not to the pair.
    assert error.key == "cert_file" and error.message.startswith(f"{cert} holds no PEM certificate")


def test_a_key_that_does_not_match_the_certificate(
    tmp_path: Path, ca: trustme.CA, client: trustme.LeafCert
) -> None:
    other = ca.issue_cert("other@example.org")
    cert = write(tmp_path / "client.pem", client.cert_chain_pems[0].bytes())
    key = write(tmp_path / "other.key", other.private_key_pem.bytes())
    error = tls_error(None, cert, key)
    assert error.key == "key_file"
    assert error.message.startswith(f"{key} is not a PEM private key matching cert_file")
    assert "KEY_VALUES_MISMATCH" in error.message


def test_a_key_file_that_is_not_pem(tmp_path: Path, client: trustme.LeafCert) -> None:
    cert = write(tmp_path / "client.pem", client.cert_chain_pems[0].bytes())
    key = write(tmp_path / "client.key", b"garbage\n")
    error = tls_error(None, cert, key)
    assert error.key == "key_file" and "is not a PEM private key" in error.message


def test_a_key_without_a_certificate(tmp_path: Path, client: trustme.LeafCert) -> None:
    key = write(tmp_path / "client.key", client.private_key_pem.bytes())
    error = tls_error(None, None, key)
    assert error.key == "key_file" and "cert_file" in error.message


def encrypted(client: trustme.LeafCert, fmt: serialization.PrivateFormat) -> bytes:
    # trustme only writes unencrypted keys.
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
    )


FORMATS = [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]


@pytest.mark.parametrize("fmt", FORMATS, ids=["pkcs8", "traditional"])
def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(
    tmp_path: Path, client: trustme.LeafCert, fmt: serialization.PrivateFormat
) -> None:
    cert = write(tmp_path / "client.pem", client.cert_chain_pems[0].bytes())
    key = write(tmp_path / "client.key", encrypted(client, fmt))
    # Only the password callback can say "encrypted": OpenSSL's own default would prompt on the
    # terminal (a hang for a service) or, with none, fail as a plain key/cert mismatch.
    error = tls_error(None, cert, key)
    assert error.key == "key_file"
    assert error.message == f"the private key in {key} is encrypted: give an unencrypted key"


def test_an_encrypted_key_inside_the_cert_file_is_named_at_cert_file(
    tmp_path: Path, client: trustme.LeafCert
) -> None:
    pem = client.cert_chain_pems[0].bytes() + encrypted(client, serialization.PrivateFormat.PKCS8)
    both = write(tmp_path / "client.pem", pem)
    error = tls_error(None, both)
    assert error.key == "cert_file" and "is encrypted" in error.message
