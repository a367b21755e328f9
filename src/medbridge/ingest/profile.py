"""Anonymisation profiles: what a DICOM file must look like to get in, loaded from TOML data.

A profile is a list of rules, one per attribute, each naming what the gate requires of it
(see ``profiles/ps3-15-basic.toml``, the built-in profile, for the file format).  Loading
validates every key and names the bad one.  ``clean`` applies a profile to a pydicom data
set, so that a copy passes; it never touches pixels.
"""

from __future__ import annotations

import copy
import enum
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from medbridge.config import check_keys
from medbridge.errors import InvalidInput

BUILT_IN = "ps3-15-basic.toml"

_PROFILE_KEYS = frozenset(
    {
        "name",
        "description",
        "private_tags",
        "require_pixel_data",
        "pseudonym_pattern",
        "deidentification_method",
        "rules",
    }
)
_RULE_KEYS = frozenset({"tag", "keyword", "require", "value", "pattern"})
_TAG = re.compile(r"\(?\s*([0-9A-Fa-fXx]{4})\s*,\s*([0-9A-Fa-fXx]{4})\s*\)?")


class Requirement(enum.StrEnum):
    """What the gate requires of one attribute."""

    ABSENT = "absent"
    EMPTY = "empty"
    PSEUDONYM = "pseudonym"
    EQUAL = "equal"
    NOT_EQUAL = "not-equal"
    PRESENT = "present"


@dataclass(frozen=True)
class TagPattern:
    """A tag, or a family of tags when some hex digits are ``x`` (``(60xx,3000)``)."""

    value: int
    mask: int = 0xFFFFFFFF

    @classmethod
    def parse(cls, text: str) -> TagPattern:
        m = _TAG.fullmatch(text.strip())
        if not m:
            raise ValueError(f"tag {text!r} is not '(gggg,eeee)'")
        digits = (m.group(1) + m.group(2)).lower()
        value = int(digits.replace("x", "0"), 16)
        mask = int("".join("0" if d == "x" else "f" for d in digits), 16)
        return cls(value, mask)

    @property
    def exact(self) -> bool:
        return self.mask == 0xFFFFFFFF

    def matches(self, tag: int) -> bool:
        return tag & self.mask == self.value

    def __str__(self) -> str:
        digits = "".join(
            f"{(self.value >> shift) & 0xF:X}" if (self.mask >> shift) & 0xF else "x" for shift in range(28, -4, -4)
        )
        return f"({digits[:4]},{digits[4:]})"


@dataclass(frozen=True)
class Rule:
    """One attribute and what the gate requires of it."""

    tag: TagPattern
    keyword: str
    require: Requirement
    value: str | None = None
    pattern: re.Pattern[str] | None = None

    def problem(self, present: bool, empty: bool, text: str | None) -> str | None:
        """Why an attribute in this state breaks the rule, or None; ``text`` is None when not comparable.

        Reasons never quote the value: reports must not carry what the gate keeps out.
        """
        if self.require is Requirement.EQUAL:
            if not present or empty:
                return f"must be {self.value!r}; it is missing"
            return None if _same(text, self.value) else f"must be {self.value!r}"
        if self.require is Requirement.PRESENT:
            return None if present and not empty else "must be present and not empty"
        if not present:
            return None
        if self.require is Requirement.ABSENT:
            return "must be absent" + ("; it is present and empty" if empty else "")
        if empty:
            return None
        if self.require is Requirement.EMPTY:
            return "must be absent or empty"
        if self.require is Requirement.PSEUDONYM:
            assert self.pattern is not None
            if text is not None and self.pattern.fullmatch(text):
                return None
            return f"must be absent, empty or a pseudonym matching {self.pattern.pattern!r}"
        return f"must not be {self.value!r}" if _same(text, self.value) else None


@dataclass(frozen=True)
class Profile:
    """A named set of rules, with the profile-wide settings."""

    name: str
    description: str
    rules: tuple[Rule, ...]
    forbid_private_tags: bool
    require_pixel_data: bool
    pseudonym_pattern: re.Pattern[str]
    deidentification_method: str
    source: str
    #: Pseudonyms declared for one dataset (keyword -> pattern), see :func:`with_pseudonyms`.
    declared: Mapping[str, str] = field(default_factory=dict)
    _exact: dict[int, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_exact", {r.tag.value: r for r in self.rules if r.tag.exact})

    def rule_for(self, tag: int) -> Rule | None:
        """The rule that covers ``tag``: its own, else the first repeating-group rule that matches."""
        rule = self._exact.get(tag)
        return rule or next((r for r in self.rules if not r.tag.exact and r.tag.matches(tag)), None)


#: Values a declared pseudonym pattern must refuse: real-looking names and record numbers.
REAL_LOOKING = ("Smith^John", "DOE^JANE^A", "Müller^Anna", "John Smith", "SMITH", "123456", "0012345678",
                "MRN123456", "19630512")  # fmt: skip


def with_pseudonyms(profile: Profile, declared: Mapping[str, str]) -> Profile:
    """``profile`` for one dataset whose identifying attributes hold declared pseudonyms.

    ``declared`` maps keywords (``PatientID``, ``PatientName``) to regular expressions
    that each value must match in full.  Only attributes the profile lets be replaced
    (``pseudonym`` or ``empty`` rules: PS3.15's D and Z actions) can be declared, and a
    pattern that would accept a real-looking name or record number is refused.  The
    result also requires Patient Identity Removed = YES (from the profile) and a
    De-identification Method (0012,0063): pseudonyms are only as good as their method.
    """
    if not declared:
        return profile
    replaced: dict[str, Rule] = {}
    by_keyword = {r.keyword: r for r in profile.rules if r.keyword}
    for keyword, text in declared.items():
        rule = by_keyword.get(keyword)
        if rule is None or rule.require not in (Requirement.PSEUDONYM, Requirement.EMPTY):
            allowed = sorted(
                k for k, r in by_keyword.items() if r.require in (Requirement.PSEUDONYM, Requirement.EMPTY)
            )
            raise InvalidInput(f"--pseudonym {keyword}: profile {profile.name} does not let {keyword} hold a "
                               f"pseudonym (attributes it does: {', '.join(allowed)})")  # fmt: skip
        pattern = _regex(text, profile.source, f"--pseudonym {keyword}")
        accepted = [probe for probe in REAL_LOOKING if pattern.fullmatch(probe)]
        if accepted or pattern.fullmatch(""):
            raise InvalidInput(f"--pseudonym {keyword}={text}: accepts the real-looking value "
                               f"{(accepted or [''])[0]!r}; declare the archive's own form")  # fmt: skip
        replaced[keyword] = Rule(rule.tag, keyword, Requirement.PSEUDONYM, None, pattern)
    method_tag = TagPattern(0x00120063)
    rules = [replaced.get(r.keyword, r) for r in profile.rules if r.tag != method_tag]
    rules.append(Rule(method_tag, "DeidentificationMethod", Requirement.PRESENT))
    summary = ", ".join(f"{k}={v}" for k, v in sorted(declared.items()))
    return Profile(name=f"{profile.name} + pseudonyms ({summary})", description=profile.description,
                   rules=tuple(rules), forbid_private_tags=profile.forbid_private_tags,
                   require_pixel_data=profile.require_pixel_data, pseudonym_pattern=profile.pseudonym_pattern,
                   deidentification_method=profile.deidentification_method, source=profile.source,
                   declared=dict(declared))  # fmt: skip


def parse_declarations(items: Sequence[str]) -> dict[str, str]:
    """``KEYWORD=REGEX`` options into a mapping; each keyword once."""
    out: dict[str, str] = {}
    for item in items:
        keyword, sep, pattern = item.partition("=")
        keyword = keyword.strip()
        if not sep or not keyword or not pattern:
            raise InvalidInput(f"--pseudonym {item!r}: use KEYWORD=REGEX, e.g. PatientID='LIDC-IDRI-[0-9]{{4}}'")
        if keyword in out:
            raise InvalidInput(f"--pseudonym {keyword} is given twice")
        out[keyword] = pattern
    return out


def load_profile(path: Path | None = None) -> Profile:
    """Load a profile from a TOML file; None loads the built-in PS3.15 basic profile."""
    if path is None:
        text = resources.files("medbridge.ingest").joinpath("profiles").joinpath(BUILT_IN).read_text(encoding="utf-8")
        return parse_profile(text, f"built-in {BUILT_IN}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read profile {path}: {exc}") from exc
    return parse_profile(text, str(path))


def parse_profile(text: str, source: str = "<profile>") -> Profile:
    """Parse and validate a profile's TOML text; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"profile {source}: not valid TOML: {exc}") from exc
    check_keys(data, _PROFILE_KEYS, f"profile {source}")
    name = _string(data, "name", source, required=True)
    private = _string(data, "private_tags", source, default="forbidden")
    if private not in ("forbidden", "allowed"):
        raise InvalidInput(f"profile {source}: private_tags must be 'forbidden' or 'allowed', not {private!r}")
    require_pixels = data.get("require_pixel_data", True)
    if not isinstance(require_pixels, bool):
        raise InvalidInput(f"profile {source}: require_pixel_data must be true or false")
    pseudonym = _regex(_string(data, "pseudonym_pattern", source, default="ANON-[0-9A-Za-z]{4,59}"), source, "")
    method = _string(data, "deidentification_method", source, default=f"medbridge {name}")
    if len(method) > 64:
        raise InvalidInput(f"profile {source}: deidentification_method is longer than 64 characters (LO)")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise InvalidInput(f"profile {source}: rules must be an array of tables")
    rules = tuple(_rule(r, i, source, pseudonym) for i, r in enumerate(raw_rules, 1))
    seen: dict[TagPattern, int] = {}
    for number, rule in enumerate(rules, 1):
        if rule.tag in seen:
            raise InvalidInput(f"profile {source}: rule {number}: {rule.tag} already has rule {seen[rule.tag]}")
        seen[rule.tag] = number
    return Profile(
        name=name,
        description=_string(data, "description", source, default=""),
        rules=rules,
        forbid_private_tags=private == "forbidden",
        require_pixel_data=require_pixels,
        pseudonym_pattern=pseudonym,
        deidentification_method=method,
        source=source,
    )


def clean(ds: Dataset, profile: Profile, *, pseudonyms: Mapping[str, str] | None = None) -> Dataset:
    """A copy of ``ds`` that meets ``profile``: forbidden attributes removed or emptied, private tags removed.

    ``pseudonyms`` maps keywords of ``pseudonym`` rules (``PatientID``) to the values to
    write; each must match its rule's pattern.  Without one, a value that already matches
    is kept and any other is emptied.
    ``equal`` rules are written (``PatientIdentityRemoved = YES``), and so is
    ``DeidentificationMethod``.  Pixels are never changed, so ``not-equal`` rules
    (``BurnedInAnnotation``) are left for the gate to refuse.
    """
    given = dict(pseudonyms or {})
    for rule in profile.rules:
        if rule.keyword in given and rule.require is Requirement.PSEUDONYM:
            assert rule.pattern is not None
            if not rule.pattern.fullmatch(given[rule.keyword]):
                raise InvalidInput(f"pseudonym for {rule.keyword} does not match {rule.pattern.pattern!r}")
    unused = set(given) - {r.keyword for r in profile.rules if r.require is Requirement.PSEUDONYM}
    if unused:
        raise InvalidInput(f"no pseudonym rule for {', '.join(sorted(unused))} in profile {profile.name}")
    out = copy.deepcopy(ds)
    if profile.forbid_private_tags:
        out.remove_private_tags()
    _clean_in(out, profile, given, top=True)
    for rule in profile.rules:
        if rule.require is Requirement.EQUAL and rule.tag.exact:
            out.add_new(BaseTag(rule.tag.value), dictionary_VR(rule.tag.value), rule.value)
    out.add_new(BaseTag(0x00120063), "LO", profile.deidentification_method)
    return out


def _clean_in(ds: Dataset, profile: Profile, pseudonyms: Mapping[str, str], *, top: bool) -> None:
    for tag in list(ds.keys()):
        rule = profile.rule_for(tag)
        elem = ds[tag]
        if rule is None or rule.require in (Requirement.EQUAL, Requirement.NOT_EQUAL, Requirement.PRESENT):
            if elem.VR == "SQ":
                for item in elem.value:
                    _clean_in(item, profile, pseudonyms, top=False)
        elif rule.require is Requirement.ABSENT:
            del ds[tag]
        elif rule.require is Requirement.PSEUDONYM and top and rule.keyword in pseudonyms:
            elem.value = pseudonyms[rule.keyword]
        elif rule.problem(True, elem.is_empty, value_text(elem.value)):
            elem.clear()


def _rule(raw: dict[str, Any], number: int, source: str, default_pattern: re.Pattern[str]) -> Rule:
    where = f"profile {source}: rule {number}"
    check_keys(raw, _RULE_KEYS, where)
    tag_text = raw.get("tag")
    keyword = raw.get("keyword")
    if tag_text is None and keyword is None:
        raise InvalidInput(f"{where}: needs a tag or a keyword")
    if keyword is not None and not isinstance(keyword, str):
        raise InvalidInput(f"{where}: keyword must be a string")
    if tag_text is not None and not isinstance(tag_text, str):
        raise InvalidInput(f"{where}: tag must be a string like '(0010,0010)'")
    if keyword:
        where = f"{where} ({keyword})"
    pattern = None
    if tag_text is not None:
        try:
            pattern = TagPattern.parse(tag_text)
        except ValueError as exc:
            raise InvalidInput(f"{where}: {exc}") from exc
    if keyword is not None:
        known = tag_for_keyword(keyword)
        if pattern is None:
            if known is None:
                raise InvalidInput(f"{where}: keyword {keyword!r} is not in the DICOM dictionary")
            pattern = TagPattern(known)
        elif keyword_for_tag(pattern.value) != keyword or (pattern.exact and known != pattern.value):
            raise InvalidInput(f"{where}: keyword {keyword!r} is not tag {pattern}")
    assert pattern is not None
    try:
        require = Requirement(str(raw.get("require")))
    except ValueError:
        valid = ", ".join(r.value for r in Requirement)
        raise InvalidInput(f"{where}: require must be one of {valid}, not {raw.get('require')!r}") from None
    value = raw.get("value")
    if require in (Requirement.EQUAL, Requirement.NOT_EQUAL):
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"{where}: require = {require.value!r} needs a string value")
    elif value is not None:
        raise InvalidInput(f"{where}: value is only for 'equal' and 'not-equal' rules")
    regex = None
    if require is Requirement.PSEUDONYM:
        text = raw.get("pattern")
        if text is not None and not isinstance(text, str):
            raise InvalidInput(f"{where}: pattern must be a string")
        regex = _regex(text, source, where) if text is not None else default_pattern
    elif "pattern" in raw:
        raise InvalidInput(f"{where}: pattern is only for 'pseudonym' rules")
    name = keyword or (keyword_for_tag(pattern.value) if pattern.exact else "")
    return Rule(pattern, name, require, value, regex)


def _string(data: Mapping[str, Any], key: str, source: str, *, default: str = "", required: bool = False) -> str:
    if key not in data:
        if required:
            raise InvalidInput(f"profile {source}: missing key {key!r}")
        return default
    value = data[key]
    if not isinstance(value, str) or (required and not value):
        raise InvalidInput(f"profile {source}: {key} must be a{' non-empty' if required else ''} string")
    return value


def _regex(text: str, source: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise InvalidInput(f"{where or f'profile {source}'}: bad pattern {text!r}: {exc}") from exc


def value_text(value: object) -> str | None:
    """An element's value as text for comparison; None for binary values and sequences."""
    if isinstance(value, str | int | float | PersonName):
        return str(value)
    if isinstance(value, MultiValue | list):
        parts = [value_text(v) for v in value]
        return None if None in parts else "\\".join(p for p in parts if p is not None)
    return None


def _same(text: str | None, value: str | None) -> bool:
    return text is not None and value is not None and text.strip().upper() == value.strip().upper()
