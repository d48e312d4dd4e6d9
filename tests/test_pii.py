"""Personal data and secrets in training text (shared/data/pii.py): what is found, what is deliberately not.

Every kind has positives and near-miss negatives (the shapes that ordinary text, numbers, dates, times
and versions take), because a scanner that cries wolf on every dataset gets ignored.
"""

from __future__ import annotations

import itertools
import time

import pytest

from shared.data import pii
from shared.data.pii import PII_KINDS, find, iban_ok, luhn_ok, redact, scan, scan_each

# Test values: documented examples and well-known test numbers, no real person's data.
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" + "k1L2m3N4o5P6q7R8"  # 36 characters
OPENAI_KEY = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----"

POSITIVES: list[tuple[str, str]] = [
    ("email", "Write to jane.doe+ml@example.co.uk."),
    ("email", "(contact: ops@mail.example.com)"),
    ("phone", "Call +44 20 7946 0958 today"),
    ("phone", "Call +1 (415) 555-0132"),
    ("phone", "whatsapp +33612345678"),
    ("phone", "Office: (415) 555-0132"),
    ("phone", "Office: 415-555-0132"),
    ("phone", "Office: 415.555.0132"),
    ("phone", "London 020 7946 0958"),
    ("phone", "mobile 07700 900123"),
    ("phone", "Paris 01 23 45 67 89"),
    ("phone", "Berlin 030 1234567"),
    ("payment_card", "Visa 4111 1111 1111 1111 expires soon"),
    ("payment_card", "card=4111111111111111"),
    ("payment_card", "MC 5500-0000-0000-0004"),
    ("payment_card", "Amex 3782 822463 10005"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32"),
    ("iban", "IBAN DE89370400440532013000"),
    ("us_ssn", "SSN 123-45-6789"),
    ("uk_nino", "NI number AB123456C"),
    ("uk_nino", "NI number AB 12 34 56 C"),
    ("ipv4", "ssh to 192.168.1.20."),
    ("ipv4", "from 8.8.8.8 and back"),
    ("ipv4", "1.2.3.4"),  # a bare dotted quad counts: it cannot be told from an address
    ("ipv6", "server 2001:db8::8a2e:370:7334"),
    ("ipv6", "link-local fe80::1%eth0"),
    ("aws_access_key", "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"),
    ("github_token", f"token: {GITHUB_TOKEN}"),
    ("openai_key", f"OPENAI_API_KEY={OPENAI_KEY}"),
    ("openai_key", "key sk-" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6kM9nP2rS5uV"),
    ("slack_token", "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("slack_token", "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"),
    ("private_key", f"here:\n{PEM}\nthanks"),
    ("jwt", f"Authorization: Bearer {JWT}"),
]


@pytest.mark.parametrize(("kind", "text"), POSITIVES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(POSITIVES)])
def test_each_kind_is_found(kind: str, text: str) -> None:
    assert scan(text) == {kind: 1}


NEGATIVES: list[tuple[str, str]] = [
    ("16 digits failing Luhn", "order 4111 1111 1111 1112"),
    ("16 digits of no card scheme", "id 1234567890123452"),
    ("a 13-digit sum that passes Luhn", "The result is: 4212883012996"),
    ("a list of years", "in 2019 2020 2021 2022 sales rose"),
    ("an ISO date", "on 2023-05-17 at noon"),
    ("an ISO timestamp", "2024-01-31T10:00:00Z"),
    ("a European date", "on 05.06.2023"),
    ("a time", "at 12:30:45"),
    ("a version", "version 1.2.3.4"),
    ("a v-version", "upgrade to v1.2.3.4"),
    ("a longer dotted run", "OID 1.3.6.1.4.1"),
    ("a three-part version", "python 3.11.7"),
    ("loopback", "bind 127.0.0.1"),
    ("unspecified", "listen 0.0.0.0"),
    ("a netmask", "mask 255.255.255.0"),
    ("an octet over 255", "999.1.1.1"),
    ("C++ scope", "std::vector<int> and a::b"),
    ("a MAC address", "00:1A:2B:3C:4D:5E"),
    ("IPv6 loopback", "::1"),
    ("a bare digit run", "call 4155550132"),
    ("an amount", "$1,234,567.89"),
    ("a signed number in a sum", "472547338\n+960397912423686"),
    ("a short plus number", "+5 3"),
    ("page ranges", "pages 100-200"),
    ("an invalid SSN area 000", "000-12-3456"),
    ("an invalid SSN area 666", "666-12-3456"),
    ("an invalid SSN area 9xx", "912-34-5678"),
    ("an invalid SSN group", "123-00-4567"),
    ("an invalid SSN serial", "123-45-0000"),
    ("a NINO with a prefix never issued", "QQ123456C and GB123456A"),
    ("an IBAN failing mod-97", "GB82 WEST 1234 5698 7654 33"),
    ("an IBAN of the wrong length", "DE8937040044053201300"),
    ("user@localhost", "ssh user@localhost"),
    ("sk-learn", "use sk-learn-compatible-estimators-and-pipelines"),
    ("a short sk- word", "sk-abc123"),
    (
        "a public key",
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    ),
    ("zeros", "000 000 000"),
    ("a phone-like product code", "SKU 1-800-FLOWERS"),
]


@pytest.mark.parametrize(("what", "text"), NEGATIVES, ids=[what for what, _ in NEGATIVES])
def test_near_misses_are_not_reported(what: str, text: str) -> None:
    assert scan(text) == {}, what


def test_the_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert luhn_ok("378282246310005")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    assert not iban_ok("XX82WEST12345698765432")  # no such country


def test_redact_replaces_each_finding_with_its_kind() -> None:
    text = f"Mail jane@example.com or call +44 20 7946 0958; key {OPENAI_KEY}.\n{PEM}\nbye"
    assert redact(text) == (
        "Mail [REDACTED:email] or call [REDACTED:phone]; key [REDACTED:openai_key].\n[REDACTED:private_key]\nbye"
    )
    assert redact("nothing to see here, version 1.2.3.4") == "nothing to see here, version 1.2.3.4"


def test_findings_never_overlap_and_the_stronger_kind_wins() -> None:
    # An IBAN's digits could read as a card, a URL with an address as an IP: each span is counted once.
    text = "IBAN DE89370400440532013000, mail admin@10.0.0.1.example.com"
    kinds = [f.kind for f in find(text)]
    assert kinds == ["iban", "email"]
    spans = [(f.start, f.end) for f in find(text * 3)]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


def test_scan_each_matches_scan_text_by_text() -> None:
    texts = [POSITIVES[i][1] for i in range(0, len(POSITIVES), 3)] + ["", "nothing", PEM, "end " + PEM[:40]]
    assert scan_each(texts) == [scan(text) for text in texts]


def test_a_private_key_block_does_not_swallow_the_next_text_of_a_batch() -> None:
    begin_only = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcN"
    assert scan_each([begin_only, "-----END RSA PRIVATE KEY----- and jane@example.com"]) == [
        {"private_key": 1},
        {"email": 1},
    ]


def test_every_kind_is_listed_and_reachable() -> None:
    assert set(PII_KINDS) == {kind for kind, _ in POSITIVES}
    assert set(PII_KINDS) >= pii.SECRET_KINDS


def test_scanning_is_fast_and_linear_even_on_hostile_text() -> None:
    prose = (
        "The quick brown fox, born 2019-03-04, paid $12.50 for version 3.11.7 of item 42. " * 12_000
    )  # ~1 MB
    started = time.monotonic()
    assert scan(prose) == {}
    assert time.monotonic() - started < 0.5
    crowded = "a@b.co " * 50_000 + "192.168.0.1 4111111111111111 " * 20_000
    started = time.monotonic()
    assert scan(crowded) == {"email": 50_000, "ipv4": 20_000, "payment_card": 20_000}
    assert time.monotonic() - started < 2
