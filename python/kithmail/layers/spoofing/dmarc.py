"""DMARC (RFC 7489): the header From's domain, its policy record, and alignment.

`author(header_lines)` finds the RFC 5322.From domain with a small parser
of our own (quoted strings, comments, angle brackets and groups), so that a
display name such as `"paypal.com" <x@evil.test>` is never read as the
address: only the addr-spec counts. `evaluate()` looks the policy record up
at `_dmarc.<From domain>`, then at `_dmarc.<organisational domain>`, and
checks whether an SPF pass (the MAIL FROM identity, RFC 7489 §4.1) or a
DKIM pass is aligned with the From domain, relaxed or strict as `aspf` and
`adkim` say.

The organisational domain comes from the public suffix list shipped inside
the `publicsuffixlist` package (its version pinned in pyproject.toml): it is
read from the installed package once per process and never fetched.

`pct=` sampling is deterministic: a message is "in the sample" when the
SHA-256 of its Message-ID (or, with none, of its From and Date fields),
read as a number, modulo 100 is below `pct`. The same message gets the
same answer on every retry and in every test; a message left out has the
next weaker policy applied (reject → quarantine, quarantine → none, RFC
7489 §6.6.4).

Trusts nothing in the message or in DNS answers: both are parsed here with
bounds (a From field is cut at `MAX_FROM` characters, a record at what the
resolver hands back) and every lookup goes through kithmail's resolver.
Standards: RFC 7489 (DMARC), RFC 5322 §3.4 and §3.6.2 (From), RFC 6532.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from publicsuffixlist import PublicSuffixList

from kithmail.dns import Resolver, Status
from kithmail.layers.spoofing.results import DkimResult, DmarcResult, SpfResult

__all__ = [
    "Author",
    "Policy",
    "Record",
    "author",
    "default_psl",
    "evaluate",
    "header_fields",
    "org_domain",
    "parse_record",
    "sample_bucket",
    "with_reason",
]

Policy = Literal["none", "quarantine", "reject"]
_POLICIES: tuple[Policy, ...] = ("none", "quarantine", "reject")
_WEAKER: dict[Policy, Policy] = {"reject": "quarantine", "quarantine": "none", "none": "none"}

MAX_FROM = 4096  # characters of From field parsed; a real one is far shorter
MAX_ADDRESSES = 32


@functools.cache
def default_psl() -> PublicSuffixList:
    """The public suffix list of the installed package, loaded once (about 50 ms)."""
    return PublicSuffixList()


def org_domain(domain: str, psl: PublicSuffixList) -> str:
    """The organisational domain (RFC 7489 §3.2): the public suffix plus one label.

    A domain that is itself a public suffix is its own organisational domain.
    """
    d = domain.lower().rstrip(".")
    return psl.privatesuffix(d) or d


# ---------------------------------------------------------------- header fields


def header_fields(lines: Iterable[bytes]) -> list[tuple[str, str]]:
    """(name, unfolded value) of each header field; lines after the empty line are ignored.

    Values are decoded as UTF-8 (RFC 6532), bytes that are not UTF-8 kept
    visible as U+FFFD; names are lower-cased.
    """
    out: list[tuple[str, str]] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            break
        if line[0] in " \t":
            if out:
                name, value = out[-1]
                out[-1] = (name, value + line)
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue  # not a field: the listener refused these already; ignore if not
        out.append((name.strip().lower(), value))
    return out


# ---------------------------------------------------------------- From addresses


@dataclass(frozen=True, slots=True)
class Author:
    """What the From field(s) say: the addresses' (local part, domain), in order."""

    fields: int  # how many From fields the message has
    addresses: tuple[tuple[str, str], ...] = ()
    problem: str = ""  # why no single author domain can be named ("" when one can)

    @property
    def domain(self) -> str:
        """The one From domain, or "" when there is none or several."""
        return "" if self.problem else self.addresses[0][1]

    @property
    def address(self) -> str:
        """The single From address, or "" (several addresses, or none)."""
        if self.problem or len(self.addresses) != 1:
            return ""
        local, domain = self.addresses[0]
        return f"{local}@{domain}"


_LDH_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?")


def _fold_domain(d: str) -> str | None:
    """A domain lower-cased in A-label form, or None when it is not a domain name."""
    d = d.strip().rstrip(".")
    if not d or len(d) > 253:
        return None
    try:
        a = d.encode("idna").decode("ascii").lower() if not d.isascii() else d.lower()
    except UnicodeError:
        return None
    labels = a.split(".")
    if len(labels) < 2 or not all(_LDH_LABEL.fullmatch(x) for x in labels):
        return None
    return a


def _mailboxes(value: str) -> list[str] | None:
    """The addr-specs of an RFC 5322 address list, or None when it does not parse.

    Comments are dropped, quoted strings kept whole (a comma or an @ inside
    one separates nothing), and the angle-bracketed part of a name-addr is
    the address: a display name never is. A group's name and its `;` are
    dropped, its members kept.
    """
    specs: list[str] = []
    cur: list[str] = []  # the current mailbox, comments removed
    angle: list[str] | None = None  # inside <...>
    angled = ""  # the last <...> of the current mailbox
    i, n = 0, len(value)

    def close() -> None:
        nonlocal cur, angled
        text = angled or "".join(cur).strip()
        if text:
            specs.append(text)
        cur, angled = [], ""

    while i < n:
        c = value[i]
        if c == '"':
            j = i + 1
            while j < n and value[j] != '"':
                j += 2 if value[j] == "\\" else 1
            if j >= n:
                return None  # an unterminated quoted string
            (cur if angle is None else angle).append(value[i : j + 1])
            i = j + 1
            continue
        if c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if value[j] == "\\":
                    j += 1
                elif value[j] == "(":
                    depth += 1
                elif value[j] == ")":
                    depth -= 1
                j += 1
            if depth:
                return None  # an unterminated comment
            i = j
            continue
        if angle is not None:
            if c == ">":
                angled, angle = "".join(angle).strip(), None
            elif c == "<":
                return None
            else:
                angle.append(c)
        elif c == "<":
            angle = []
        elif c in ",;":
            close()
        elif c == ":" and "@" not in "".join(cur):
            cur = []  # a group's display name (or a route's end): not an address
        else:
            cur.append(c)
        i += 1
    if angle is not None:
        return None
    close()
    return specs


def _split_addr_spec(spec: str) -> tuple[str, str] | None:
    """(local part, folded domain) of `local@domain`; None when it is not one."""
    # A source route (<@a,@b:user@d>) keeps only what follows its colon.
    if spec.startswith("@") and ":" in spec:
        spec = spec.split(":", 1)[1]
    # The last @ outside a quoted local part separates the domain.
    at, inq, k = -1, False, 0
    while k < len(spec):
        ch = spec[k]
        if ch == "\\" and inq:
            k += 2
            continue
        if ch == '"':
            inq = not inq
        elif ch == "@" and not inq:
            at = k
        k += 1
    if at <= 0:
        return None
    local = re.sub(r"\s+", "", spec[:at]) if not spec.startswith('"') else spec[:at].strip()
    domain = _fold_domain(re.sub(r"\s+", "", spec[at + 1 :]))
    if domain is None or not local:
        return None
    return local, domain


def author(header_lines: Iterable[bytes]) -> Author:
    """The From field(s) of a message, as RFC 7489 §6.6.1 needs them.

    Zero From fields, several From fields, an address that does not parse
    and several addresses of different domains each leave no single author
    domain (`problem` says which); several addresses of one domain name
    that domain.
    """
    values = [v for name, v in header_fields(header_lines) if name == "from"]
    if not values:
        return Author(0, problem="no From field")
    if len(values) > 1:
        return Author(len(values), problem=f"{len(values)} From fields")
    specs = _mailboxes(values[0][:MAX_FROM])
    if specs is None:
        return Author(1, problem="the From field does not parse")
    if not specs:
        return Author(1, problem="no address in the From field")
    addresses: list[tuple[str, str]] = []
    for spec in specs[:MAX_ADDRESSES]:
        parsed = _split_addr_spec(spec)
        if parsed is None:
            return Author(1, problem="a From address without a valid domain")
        addresses.append(parsed)
    if len(specs) > MAX_ADDRESSES:
        return Author(1, tuple(addresses), f"more than {MAX_ADDRESSES} From addresses")
    if len({d for _, d in addresses}) > 1:
        return Author(1, tuple(addresses), "From addresses of several domains")
    return Author(1, tuple(addresses))


# ---------------------------------------------------------------- the record


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed DMARC policy record (RFC 7489 §6.3); unknown tags are ignored."""

    p: Policy
    sp: Policy | None = None
    pct: int = 100
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"


def parse_record(text: str) -> Record | str:
    """The record, or the reason it is not a valid one (a permerror)."""
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    for k, part in enumerate(parts):
        if not part:
            if k == len(parts) - 1:
                continue  # a trailing ";"
            return "an empty tag in the DMARC record"
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            return "a malformed tag in the DMARC record"
        if name in tags:
            return f"the tag {name}= twice in the DMARC record"
        tags[name] = value
    if next(iter(tags), "") != "v" or tags["v"] != "DMARC1":
        return "the DMARC record does not begin with v=DMARC1"
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        # RFC 7489 §6.6.3: with a valid rua= it counts as p=none.
        if "mailto:" in tags.get("rua", "").lower():
            p = "none"
        else:
            return "no valid p= in the DMARC record"
    sp_raw = tags.get("sp", "").lower()
    sp: Policy | None = next((x for x in _POLICIES if x == sp_raw), None)
    pct = 100
    if re.fullmatch(r"\d{1,3}", tags.get("pct", "")):
        pct = min(int(tags["pct"]), 100)
    adkim: Literal["r", "s"] = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf: Literal["r", "s"] = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return Record(next(x for x in _POLICIES if x == p), sp, pct, adkim, aspf)


def _dmarc_records(texts: Sequence[str]) -> list[str]:
    # RFC 7489 §6.6.3 step 3: records that do not start with "v=DMARC1" are
    # not DMARC records at all.
    return [t for t in texts if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t)]


# ---------------------------------------------------------------- evaluation


def sample_bucket(key: str) -> int:
    """0–99, the same for the same key: where a message falls for `pct=`."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "replace")).digest()[:8]) % 100


def aligned(a: str, b: str, mode: Literal["r", "s"], psl: PublicSuffixList) -> bool:
    """Identifier alignment (RFC 7489 §3.1): equal (strict) or same organisational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    if a == b:
        return True
    return mode == "r" and org_domain(a, psl) == org_domain(b, psl)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A DMARC result and the disposition it implies before local policy."""

    result: DmarcResult
    disposition: Policy | None  # what the policy asks for this message (None: no policy)
    # (for a temperror: what a fail would have met, None when the policy is unknown)
    sampled_out: bool = False


async def evaluate(
    resolver: Resolver,
    psl: PublicSuffixList,
    from_domain: str,
    *,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    sample_key: str,
) -> Evaluation:
    """DMARC for one From domain: find the record, check alignment, apply p/sp/pct."""
    org = org_domain(from_domain, psl)
    record: Record | None = None
    at = ""  # where the record was found
    for name in dict.fromkeys((from_domain, org)):
        r = await resolver.txt(f"_dmarc.{name}")
        if r.temporary:
            why = "timed out" if r.status is Status.TIMEOUT else "failed"
            res = DmarcResult("temperror", from_domain, org, reason=f"_dmarc.{name} lookup {why}")
            return Evaluation(_aligned(res, spf, dkim, psl, "r", "r"), None)
        if r.status is Status.MALFORMED:
            res = DmarcResult("permerror", from_domain, org, reason="bad DMARC query name")
            return Evaluation(res, None)
        texts = _dmarc_records(r.records)
        if len(texts) > 1:
            # §6.6.3 step 5: several records → no DMARC processing.
            return Evaluation(
                DmarcResult("none", from_domain, org, reason=f"several DMARC records at {name}"),
                None,
            )
        if texts:
            parsed = parse_record(texts[0])
            if isinstance(parsed, str):
                return Evaluation(DmarcResult("permerror", from_domain, org, reason=parsed), None)
            record, at = parsed, name
            break
    if record is None:
        return Evaluation(DmarcResult("none", from_domain, org, reason="no DMARC record"), None)

    # sp= applies only when the record came from the organisational domain
    # for a From domain below it (§6.3, §6.6.3 step 6).
    policy: Policy = record.sp if (at != from_domain and record.sp is not None) else record.p
    res = _aligned(
        DmarcResult("fail", from_domain, org, policy), spf, dkim, psl, record.aspf, record.adkim
    )
    if res.result == "pass":
        return Evaluation(res, "none")
    if any(
        d.result == "temperror" and aligned(d.domain, from_domain, record.adkim, psl) for d in dkim
    ):
        # An aligned signature we could not check might have passed: the
        # result is unknown, not fail, and the disposition is what a fail
        # would have met (the caller defers rather than refuse or accept).
        reason = "the key lookup of an aligned DKIM signature timed out or failed"
        return Evaluation(DmarcResult("temperror", from_domain, org, policy, reason=reason), policy)
    sampled_out = record.pct < 100 and sample_bucket(sample_key) >= record.pct
    if sampled_out:
        applied = _WEAKER[policy]
        reason = f"pct={record.pct}: not sampled, {policy} applied as {applied}"
        return Evaluation(with_reason(res, reason), applied, sampled_out=True)
    return Evaluation(res, policy)


def with_reason(r: DmarcResult, reason: str) -> DmarcResult:
    return DmarcResult(
        r.result, r.from_domain, r.org_domain, r.policy, r.spf_aligned, r.dkim_aligned, reason
    )


def _aligned(
    r: DmarcResult,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    psl: PublicSuffixList,
    aspf: Literal["r", "s"],
    adkim: Literal["r", "s"],
) -> DmarcResult:
    """`r` with its alignment filled in; a fail becomes a pass when either aligns."""
    spf_ok = (
        spf is not None and spf.result == "pass" and aligned(spf.domain, r.from_domain, aspf, psl)
    )
    dkim_ok = any(d.result == "pass" and aligned(d.domain, r.from_domain, adkim, psl) for d in dkim)
    result = "pass" if (spf_ok or dkim_ok) and r.result == "fail" else r.result
    reason = r.reason
    if result == "fail":
        reason = reason or "neither SPF nor DKIM aligned with the From domain"
    return DmarcResult(result, r.from_domain, r.org_domain, r.policy, spf_ok, dkim_ok, reason)
