"""Credentials of a Flower federation, made by one command (``nnunet-adpfl flower credentials``).

Layout of the output folder::

    ca.crt, ca.key                  the federation's own certificate authority (keep ca.key offline)
    superlink.crt, superlink.key    the SuperLink's TLS certificate for the given hosts/IPs, signed by the CA
    sites/<site>/node.key           the site's Flower node-authentication key (EC P-384, OpenSSH format)
    sites/<site>/node.pub           its public key: the coordinator registers it ('flwr supernode register')
    sites/<site>/ca.crt             the CA certificate the site's SuperNode checks the SuperLink with

Give each site its sites/<site>/ folder (with its federation key <site>.key from 'federation init'), out of band.
Existing files are never overwritten (re-running the command adds what is missing).
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..common.atomic import write_bytes_atomic

VALID_DAYS = 825


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nnunet-adpfl federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names = []
    for h in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key, ca: bool, hosts=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(_san(list(hosts)), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return b.sign(signing_key, hashes.SHA256())


def _write_new(path: Path, data: bytes, secret: bool) -> None:
    if not path.exists():
        write_bytes_atomic(path, data, mode=0o600 if secret else 0o644)


def node_key_pair() -> tuple[bytes, bytes]:
    """A Flower node-authentication key pair (EC P-384): (OpenSSH private key, OpenSSH public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def make_credentials(out: str | Path, hosts: list[str], sites: list[str]) -> dict[str, Path]:
    """CA, SuperLink TLS certificate for ``hosts`` and one node key pair per site in ``out``; returns the paths."""
    out = Path(out)
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    if not ca_crt.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _certificate(_name("nnunet-adpfl federation CA"), _name("nnunet-adpfl federation CA"),
                            key.public_key(), key, ca=True)
        _write_new(ca_key, _pem_key(key), secret=True)
        _write_new(ca_crt, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    server_crt, server_key = out / "superlink.crt", out / "superlink.key"
    if not server_crt.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _certificate(_name(hosts[0] if hosts else "localhost"), ca_cert.subject, key.public_key(),
                            ca_private, ca=False, hosts=hosts)
        _write_new(server_key, _pem_key(key), secret=True)
        _write_new(server_crt, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    paths = {"ca": ca_crt, "certfile": server_crt, "keyfile": server_key}
    for site in sites:
        d = out / "sites" / site
        if not (d / "node.key").exists():
            private, public = node_key_pair()
            _write_new(d / "node.key", private, secret=True)
            write_bytes_atomic(d / "node.pub", public, mode=0o644)
        _write_new(d / "ca.crt", ca_crt.read_bytes(), secret=False)
        paths[site] = d
    return paths


def server_certificate_hosts(path: str | Path) -> list[str]:
    """The names and IPs a SuperLink certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]
