"""The CA and server certificate of ``init`` (``agent.certs``): what strict verifiers
ask of them."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.certs import CERT_DAYS, make_ca, make_server_cert


def test_the_server_certificate_is_issued_by_the_ca_for_every_name_and_address() -> None:
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    ca_key, ca = make_ca("nas1", now=now)
    _, cert = make_server_cert(
        ca_key,
        ca,
        dns_names=["nas1.lan", "nas1"],
        ips=[ipaddress.ip_address("192.0.2.7")],
        now=now,
    )
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nas1.lan", "nas1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc - now <= dt.timedelta(days=CERT_DAYS)
    assert cert.not_valid_before_utc < now  # a little clock skew is allowed for
