"""Personal data and secrets in training text: counted when a dataset is uploaded, redacted on request.

`scan(text)` counts findings by kind, `redact(text)` replaces each with `[REDACTED:<kind>]`, `find(text)`
lists them. Detection favours precision over recall: a match must have the right shape AND pass the
checks its kind has (Luhn for payment cards, mod-97 for IBANs, the issuing rules for SSNs and NINOs, a
real address for IPs), so that ordinary numbers, dates, times and version strings are not reported.

What is covered (and deliberately not):

- email: `local@domain.tld` with an alphabetic TLD (`user@localhost` is not counted).
- phone: international numbers written with a `+` and a country code, 8-15 digits (`+44 20 7946 0958`,
  `+1 (415) 555-0132`, `+33612345678`); North American `(415) 555-0132`, `415-555-0132`,
  `415.555.0132` (area code and exchange starting 2-9, the same separator twice); European national forms
  with a leading trunk `0` and at least one separator (`020 7946 0958`, `07700 900123`,
  `01 23 45 67 89`, `030 1234567`). Bare digit runs (`4155550132`) are not counted: they are
  indistinguishable from ids and amounts.
- payment_card: 13-19 digits, bare or in groups separated by single spaces or dashes, starting 2-6
  (the issuer ranges in use), passing the Luhn check.
- iban: country code, check digits and the country's exact length, compact or in groups of four,
  passing the ISO 13616 mod-97 check.
- us_ssn: `123-45-6789` only (dashed; bare nine digits are too common), area not 000, 666 or 9xx,
  group not 00, serial not 0000.
- uk_nino: UK National Insurance numbers, `AB123456C` or `AB 12 34 56 C`, with the prefixes HMRC never
  issues (D, F, I, Q, U, V; O second; BG, GB, KN, NK, NT, TN, ZZ) excluded. No other national ids are
  covered: their shapes collide with ordinary numbers without a context the scanner does not have.
- ipv4: a dotted quad of octets 0-255 without leading zeros, not part of a longer dotted run
  (`1.2.3.4.5`), not preceded by `v`/`version`/`ver` (`v1.2.3.4`, `version 1.2.3.4` are versions) and
  not an address that identifies nobody: 0.0.0.0/8, loopback 127/8, and 255.x (netmasks, broadcast).
  A bare `1.2.3.4` IS counted: a four-part version number and an address cannot be told apart, and
  a dataset that mentions addresses is worth a second look.
- ipv6: full or `::`-compressed forms that `ipaddress` accepts, with at least two groups and one
  decimal digit (so C++'s `a::b` and MAC addresses are not counted); loopback and `::` excluded.
- secrets: aws_access_key (`AKIA`/`ASIA` + 16), github_token (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` +
  36, `github_pat_`), openai_key (`sk-`, `sk-proj-`, ... with a body of 20+ characters mixing upper,
  lower and digits, so `sk-learn` is not one), slack_token (`xoxb-`/`xoxp-`/... tokens and
  `hooks.slack.com` webhook URLs), private_key (PEM `-----BEGIN ... PRIVATE KEY-----` blocks, the whole
  block), jwt (three base64url parts, header and payload starting `eyJ`).

Overlaps are resolved by a fixed priority (secrets, then email, iban, payment_card, us_ssn, uk_nino,
ipv6, ipv4, phone): a span claimed by one kind is not counted again as another.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

PII_KINDS: tuple[str, ...] = (
    "email",
    "phone",
    "payment_card",
    "iban",
    "us_ssn",
    "uk_nino",
    "ipv4",
    "ipv6",
    "aws_access_key",
    "github_token",
    "openai_key",
    "slack_token",
    "private_key",
    "jwt",
)
SECRET_KINDS: frozenset[str] = frozenset(
    {"aws_access_key", "github_token", "openai_key", "slack_token", "private_key", "jwt"}
)


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


# -- validators -----------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# ISO 13616 registry lengths (SWIFT IBAN registry), for the countries that issue IBANs.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_ok(compact: str) -> bool:
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


# -- patterns -------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?P<t>(?:[A-Z0-9]+ )*)PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END (?P=t)PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s:,-]*)",
    re.DOTALL,
)
_JWT = re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*(?![\w-])")
_AWS = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])")
_GITHUB = re.compile(
    r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})(?![A-Za-z0-9_])"
)
_OPENAI = re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-|ant-)?(?P<body>[A-Za-z0-9_-]{20,})(?![\w-])")
_SLACK = re.compile(
    r"(?<![\w-])xox[abposr]-[A-Za-z0-9]{4,}-[A-Za-z0-9-]{6,}(?![\w-])"
    r"|https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]{16,}"
)
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)(?![A-Za-z0-9])"
)
_CARD = re.compile(r"(?<![\d.,-])(?:\d{13,19}|\d{4}(?:([ -])\d{2,7})(?:\1\d{1,7}){0,4})(?![\d-]|[.,]\d)")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_NINO = re.compile(
    r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r"(?: ?\d{2}){3} ?[A-D](?![A-Za-z0-9])"
)
_IPV4 = re.compile(
    r"(?<![\w.])(?<!version )(?<!ver )(?<!Version )"
    r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)"
)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:.])"
)
_PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,5}\)?){1,6}(?![\w-]|[.,]\d)")
_PHONE_NANP = re.compile(r"(?<![\w.+-])(?:\([2-9]\d{2}\) ?|[2-9]\d{2}([-. ]))[2-9]\d{2}(?(1)\1|[-. ])\d{4}(?![\w-]|[.,]\d)")
_PHONE_TRUNK = re.compile(
    r"(?<![\w.+/-])(?:0[1-9](?:([ .-])\d{2})(?:\1\d{2}){3}|0\d{2,4}[ -]\d{3,4}(?:[ -]?\d{3,4})?)(?![\w-]|[.,/:]\d)"
)


def _card_ok(match: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", match[0])
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _iban_ok(match: re.Match[str]) -> bool:
    return iban_ok(match[0].replace(" ", ""))


def _ipv4_ok(match: re.Match[str]) -> bool:
    start = match.start()
    if start and match.string[start - 1] in "vV":
        return False
    address = ipaddress.IPv4Address(match[0])
    first = int(match[0].split(".", 1)[0])
    return not (address.is_loopback or first in (0, 255))


def _ipv6_ok(match: re.Match[str]) -> bool:
    text = match[0]
    groups = [g for g in text.split(":") if g]
    if len(groups) < 2 or not any(ch.isdigit() for ch in text):
        return False
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified)


def _openai_ok(match: re.Match[str]) -> bool:
    body = match["body"]
    return any(c.isdigit() for c in body) and any(c.isupper() for c in body) and any(c.islower() for c in body)


def _phone_intl_ok(match: re.Match[str]) -> bool:
    return 8 <= sum(ch.isdigit() for ch in match[0]) <= 15


def _phone_trunk_ok(match: re.Match[str]) -> bool:
    return 9 <= sum(ch.isdigit() for ch in match[0]) <= 12


def _always(_: re.Match[str]) -> bool:
    return True


# (kind, pattern, check, a substring that must be present for the pattern to be tried): in priority order.
_DETECTORS: tuple[tuple[str, re.Pattern[str], Callable[[re.Match[str]], bool], str | None], ...] = (
    ("private_key", _PRIVATE_KEY, _always, "PRIVATE KEY-----"),
    ("jwt", _JWT, _always, "eyJ"),
    ("aws_access_key", _AWS, _always, None),
    ("github_token", _GITHUB, _always, "_"),
    ("slack_token", _SLACK, _always, None),
    ("openai_key", _OPENAI, _openai_ok, "sk-"),
    ("email", _EMAIL, _always, "@"),
    ("iban", _IBAN, _iban_ok, None),
    ("payment_card", _CARD, _card_ok, None),
    ("us_ssn", _SSN, _always, "-"),
    ("uk_nino", _NINO, _always, None),
    ("ipv6", _IPV6, _ipv6_ok, ":"),
    ("ipv4", _IPV4, _ipv4_ok, "."),
    ("phone", _PHONE_INTL, _phone_intl_ok, "+"),
    ("phone", _PHONE_NANP, _always, None),
    ("phone", _PHONE_TRUNK, _phone_trunk_ok, "0"),
)
_DIGIT = re.compile(r"\d")
_NEEDS_DIGIT = frozenset({"iban", "payment_card", "us_ssn", "uk_nino", "ipv4", "ipv6", "phone"})
_SLACK_HINT = ("xox", "hooks.slack.com")
_AWS_HINT = ("AKIA", "ASIA")


def find(text: str) -> list[Finding]:
    """Every finding in `text`, in order of position, none overlapping another."""
    has_digit = _DIGIT.search(text) is not None
    taken: list[tuple[int, int]] = []
    findings: list[Finding] = []
    for kind, pattern, check, hint in _DETECTORS:
        if hint is not None and hint not in text:
            continue
        if kind in _NEEDS_DIGIT and not has_digit:
            continue
        if kind == "slack_token" and not any(h in text for h in _SLACK_HINT):
            continue
        if kind == "aws_access_key" and not any(h in text for h in _AWS_HINT):
            continue
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(start < t_end and t_start < end for t_start, t_end in taken):
                continue
            if check(match):
                taken.append((start, end))
                findings.append(Finding(kind, start, end))
    findings.sort(key=lambda f: f.start)
    return findings


def scan(text: str) -> dict[str, int]:
    """How many findings of each kind `text` holds (kinds with none are left out)."""
    counts: dict[str, int] = {}
    for finding in find(text):
        counts[finding.kind] = counts.get(finding.kind, 0) + 1
    return counts


def redact(text: str) -> str:
    """`text` with every finding replaced by `[REDACTED:<kind>]`."""
    parts: list[str] = []
    position = 0
    for finding in find(text):
        parts.append(text[position : finding.start])
        parts.append(f"[REDACTED:{finding.kind}]")
        position = finding.end
    parts.append(text[position:])
    return "".join(parts)
