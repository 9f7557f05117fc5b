"""Criteria: named, versioned definitions of what a good reply is, shared by the scorer and the gateway.

A criterion scores each reply of a best-of-N in [0, 1].  It is one of three kinds:

* **rules** -- checks needing no model (``max_words: 50``, ``regex_must_not_match: "(?i)as an ai"``,
  ``json_valid: true`` ...); each rule scores a reply 1 (pass) or 0 (fail), and the criterion combines
  its rules with ``mode`` ``all`` (1 only when every rule passes; the default) or ``mean`` (the
  fraction of rules that pass);
* **reward** -- a served reward model (or one of its attribute heads), optionally with a threshold that
  turns its score into pass/fail;
* **judge** -- a served policy asked a yes/no question about the reply, scored by P(yes).

The scorer ranks a best-of-N by the weighted combination of several criteria and breaks ties with a
``tie_breaker`` (another criterion or a reward model); the feedback processor turns the ranking into
preference records.  Both read the same definitions from the registry (:mod:`services.criteria_store`),
so they live here, in ``services/``.  This module holds the definitions only: parsing a YAML/JSON
mapping with every field checked (the error names the field, e.g. ``rules[1].regex_must_match``),
and the canonical dict form whose hash decides whether a changed definition is a new version.
Evaluation is :mod:`services.criteria_eval`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from services.checkpoints import validate_name
from services.errors import InvalidArgument

#: Rules taking a non-negative integer limit.
COUNT_RULES: tuple[str, ...] = ("max_words", "min_words", "max_chars")
#: Rules taking a regular expression (and ``flags``).
REGEX_RULES: tuple[str, ...] = ("regex_must_match", "regex_must_not_match")
#: Rules taking a list of strings (and ``flags``: ``i`` ignores case).
CONTAINS_RULES: tuple[str, ...] = ("contains_any", "contains_none")
#: Every rule name a definition may use, in documentation order.
RULE_NAMES: tuple[str, ...] = (*COUNT_RULES, *REGEX_RULES, *CONTAINS_RULES, "json_valid")

#: Regex flag letters and the ``re`` flags they stand for (Python's inline-flag letters).
REGEX_FLAGS: Mapping[str, re.RegexFlag] = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
#: How rule scores combine into the criterion's score.
MODES: tuple[str, ...] = ("all", "mean")

#: Limits that keep one definition cheap to store and to evaluate on every best-of-N.
MAX_RULES = 32
MAX_PATTERN_CHARS = 1000
MAX_NEEDLES = 100
MAX_TEXT_CHARS = 4000  # description, judge question, one needle

_TOP_KEYS = ("name", "project", "version", "description", "rules", "mode", "reward", "judge", "weight", "tie_breaker")


# ---------------------------------------------------------------------------------------------
# Definitions.


@dataclass(frozen=True)
class Rule:
    """One check on a reply: ``kind`` is a :data:`RULE_NAMES` entry, ``value`` its argument.

    ``value`` is an ``int`` for the count rules, a pattern for the regex rules, a tuple of strings for
    the contains rules and ``True`` for ``json_valid``; ``flags`` are letters of :data:`REGEX_FLAGS`
    (the contains rules accept only ``i``).
    """

    kind: str
    value: int | str | tuple[str, ...] | bool
    flags: str = ""

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {self.kind: value, **({"flags": self.flags} if self.flags else {})}

    def describe(self) -> str:
        """A short human label, used in results (``max_words 50``, ``regex_must_match /a+/i``)."""
        if self.kind in REGEX_RULES:
            return f"{self.kind} /{self.value}/{self.flags}"
        if self.kind in CONTAINS_RULES:
            case = " (ignoring case)" if "i" in self.flags else ""
            return f"{self.kind} {list(self.value)}{case}"  # type: ignore[arg-type]
        if self.kind == "json_valid":
            return "json_valid"
        return f"{self.kind} {self.value}"


@dataclass(frozen=True)
class RewardSpec:
    """A served reward model (``attribute`` names one head; empty = its scalar reward)."""

    model: str
    attribute: str = ""
    #: When set, the score is 1 if the reward is >= threshold, else 0.
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.attribute:
            out["attribute"] = self.attribute
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


@dataclass(frozen=True)
class JudgeSpec:
    """A served policy asked ``question`` (a yes/no question) about the reply; scored by P(yes)."""

    model: str
    question: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "question": self.question}


@dataclass(frozen=True)
class TieBreaker:
    """What orders replies whose combined score ties: another criterion or a reward model."""

    kind: str  # "criterion" | "reward_model"
    name: str

    def to_dict(self) -> dict[str, str]:
        return {self.kind: self.name}


@dataclass(frozen=True)
class Criterion:
    """A named, versioned definition; exactly one of ``rules``, ``reward``, ``judge`` is set.

    ``version`` is empty until the store records the definition (``v1``, ``v2`` ...); it is not part of
    the content, so the same definition always hashes the same (:meth:`digest`).
    """

    name: str
    project: str = "default"
    version: str = ""
    description: str = ""
    rules: tuple[Rule, ...] = ()
    mode: str = "all"
    reward: RewardSpec | None = None
    judge: JudgeSpec | None = None
    weight: float = 1.0
    tie_breaker: TieBreaker | None = None

    @property
    def kind(self) -> str:
        """``rules``, ``reward`` or ``judge``."""
        return "reward" if self.reward is not None else "judge" if self.judge is not None else "rules"

    @property
    def ref(self) -> str:
        """``name@version`` (just ``name`` before the store assigns a version)."""
        return f"{self.name}@{self.version}" if self.version else self.name

    def models(self) -> dict[str, str]:
        """The served models this definition names: model name -> ``reward`` or ``policy``."""
        out: dict[str, str] = {}
        if self.reward is not None:
            out[self.reward.model] = "reward"
        if self.judge is not None:
            out[self.judge.model] = "policy"
        if self.tie_breaker is not None and self.tie_breaker.kind == "reward_model":
            out.setdefault(self.tie_breaker.name, "reward")
        return out

    def to_dict(self, *, with_version: bool = True) -> dict[str, Any]:
        """The definition as a YAML/JSON mapping; :func:`parse_criterion` reads it back unchanged."""
        out: dict[str, Any] = {"name": self.name, "project": self.project}
        if with_version and self.version:
            out["version"] = self.version
        if self.description:
            out["description"] = self.description
        if self.rules:
            out["rules"] = [r.to_dict() for r in self.rules]
            out["mode"] = self.mode
        if self.reward is not None:
            out["reward"] = self.reward.to_dict()
        if self.judge is not None:
            out["judge"] = self.judge.to_dict()
        out["weight"] = self.weight
        if self.tie_breaker is not None:
            out["tie_breaker"] = self.tie_breaker.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, project: str | None = None) -> "Criterion":
        return parse_criterion(data, project=project)

    def digest(self) -> str:
        """Hash of the content (not the version, not the description): equal digests = same version.

        The description is left out so that rewording it does not start a new version of what is scored.
        """
        content = self.to_dict(with_version=False)
        content.pop("description", None)
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def split_ref(ref: str, field_name: str = "criterion") -> tuple[str, str]:
    """``name@version`` -> (name, version); ``name`` -> (name, "") meaning the latest version."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidArgument(field_name, "is empty; give a criterion name, optionally with @version (concise@v2)")
    name, sep, version = ref.strip().partition("@")
    validate_name(name, field_name)
    if sep:
        if not re.fullmatch(r"v[1-9][0-9]*", version):
            raise InvalidArgument(field_name, f"version {version!r} is not of the form v1, v2, ...")
    return name, version


# ---------------------------------------------------------------------------------------------
# Parsing: every field of an untrusted mapping, named in the error.


def parse_criterion(data: Mapping[str, Any], *, project: str | None = None) -> Criterion:
    """A :class:`Criterion` from a YAML/JSON mapping; InvalidArgument names the first bad field.

    ``project`` (e.g. the CLI's ``--project``) fills in a definition that names none, and must agree
    with one that does.
    """
    if not isinstance(data, Mapping):
        raise InvalidArgument("criterion", f"must be a mapping of fields, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(_TOP_KEYS))
    if unknown:
        raise InvalidArgument(unknown[0], f"unknown field; a criterion has {', '.join(_TOP_KEYS)}")
    name = validate_name(data.get("name", ""), "name")
    proj = data.get("project")
    if proj is None:
        proj = project or "default"
    elif project is not None and proj != project:
        raise InvalidArgument("project", f"the file says {proj!r} but {project!r} was asked for; make them agree")
    validate_name(proj, "project")
    version = data.get("version", "") or ""
    if version:
        split_ref(f"{name}@{version}", "version")
    description = _text(data.get("description", ""), "description", allow_empty=True)

    sources = [k for k in ("rules", "reward", "judge") if data.get(k) not in (None, [], {})]
    if len(sources) != 1:
        raise InvalidArgument("rules" if not sources else sources[1],
                              "a criterion is exactly one of rules, reward or judge"
                              + (f" (this one has {', '.join(sources)})" if sources else " (this one has none)")
                              + "; combine several criteria by weight instead")
    rules = _rules(data["rules"]) if "rules" in sources else ()
    mode = data.get("mode", "all")
    if mode not in MODES:
        raise InvalidArgument("mode", f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if not rules and "mode" in data and mode != "all":
        raise InvalidArgument("mode", "only rule criteria have a mode; remove it")
    reward = _reward(data["reward"]) if "reward" in sources else None
    judge = _judge(data["judge"]) if "judge" in sources else None
    weight = _number(data.get("weight", 1.0), "weight")
    if weight <= 0:
        raise InvalidArgument("weight", f"must be > 0, got {weight!r}; drop the criterion instead of weighting it 0")
    tie = _tie_breaker(data.get("tie_breaker"), name) if data.get("tie_breaker") is not None else None
    return Criterion(name=name, project=proj, version=version, description=description, rules=rules,
                     mode=mode if rules else "all", reward=reward, judge=judge, weight=weight, tie_breaker=tie)


def _text(value: Any, where: str, *, allow_empty: bool = False, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(where, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidArgument(where, "is empty")
    if len(value) > limit:
        raise InvalidArgument(where, f"has {len(value)} characters; the limit is {limit}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(where, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgument(where, f"must be a finite number, got {value!r}")
    return float(value)


def _rules(raw: Any) -> tuple[Rule, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise InvalidArgument("rules", "must be a list of rules, e.g. [{max_words: 50}, {json_valid: true}]")
    if len(raw) > MAX_RULES:
        raise InvalidArgument("rules", f"has {len(raw)} rules; the limit is {MAX_RULES}")
    return tuple(_rule(item, f"rules[{i}]") for i, item in enumerate(raw))


def _rule(item: Any, where: str) -> Rule:
    if not isinstance(item, Mapping):
        raise InvalidArgument(where, "must be a mapping with one rule, e.g. {max_words: 50}")
    kinds = [k for k in item if k != "flags"]
    if len(kinds) != 1:
        raise InvalidArgument(where, f"must name exactly one rule (got {sorted(map(str, kinds)) or 'none'}); "
                              f"known rules: {', '.join(RULE_NAMES)}")
    kind = str(kinds[0])
    if kind not in RULE_NAMES:
        raise InvalidArgument(f"{where}.{kind}", f"unknown rule; known rules: {', '.join(RULE_NAMES)}")
    value, flags = item[kind], item.get("flags", "")
    at = f"{where}.{kind}"
    if not isinstance(flags, str):
        raise InvalidArgument(f"{where}.flags", f"must be a string of flag letters, got {flags!r}")
    if kind in COUNT_RULES:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(at, f"must be a whole number >= 0, got {value!r}")
        _no_flags(flags, where, kind)
        return Rule(kind, value)
    if kind in REGEX_RULES:
        pattern = _text(value, at, limit=MAX_PATTERN_CHARS)
        bad = sorted(set(flags) - set(REGEX_FLAGS))
        if bad:
            raise InvalidArgument(f"{where}.flags", f"unknown flag {bad[0]!r}; use letters of {''.join(REGEX_FLAGS)}")
        try:
            re.compile(pattern, regex_flags(flags))
        except re.error as e:
            raise InvalidArgument(at, f"bad regex {pattern!r}: {e}") from None
        return Rule(kind, pattern, "".join(sorted(set(flags))))
    if kind in CONTAINS_RULES:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or isinstance(value, bytes) or not value:
            raise InvalidArgument(at, "must be a non-empty list of strings")
        if len(value) > MAX_NEEDLES:
            raise InvalidArgument(at, f"has {len(value)} strings; the limit is {MAX_NEEDLES}")
        needles = tuple(_text(v, f"{at}[{j}]") for j, v in enumerate(value))
        if set(flags) - {"i"}:
            raise InvalidArgument(f"{where}.flags", f"{kind} takes only the flag 'i' (ignore case), got {flags!r}")
        return Rule(kind, needles, flags and "i")
    if value is not True:
        raise InvalidArgument(at, f"write json_valid: true (got {value!r})")
    _no_flags(flags, where, kind)
    return Rule(kind, True)


def _no_flags(flags: str, where: str, kind: str) -> None:
    if flags:
        raise InvalidArgument(f"{where}.flags", f"{kind} takes no flags")


def regex_flags(flags: str) -> int:
    """The ``re`` flags of a flag-letter string (letters already validated)."""
    out = 0
    for letter in flags:
        out |= REGEX_FLAGS[letter]
    return out


def _mapping(raw: Any, where: str, keys: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(where, f"must be a mapping with {', '.join(keys)}")
    unknown = sorted(set(map(str, raw)) - set(keys))
    if unknown:
        raise InvalidArgument(f"{where}.{unknown[0]}", f"unknown field; {where} has {', '.join(keys)}")
    return raw


def _reward(raw: Any) -> RewardSpec:
    if isinstance(raw, str):
        raw = {"model": raw}
    m = _mapping(raw, "reward", ("model", "attribute", "threshold"))
    model = validate_name(m.get("model", ""), "reward.model")
    attribute = m.get("attribute", "") or ""
    if attribute:
        validate_name(attribute, "reward.attribute")
    threshold = _number(m["threshold"], "reward.threshold") if m.get("threshold") is not None else None
    return RewardSpec(model=model, attribute=attribute, threshold=threshold)


def _judge(raw: Any) -> JudgeSpec:
    m = _mapping(raw, "judge", ("model", "question"))
    model = validate_name(m.get("model", ""), "judge.model")
    question = _text(m.get("question", ""), "judge.question").strip()
    return JudgeSpec(model=model, question=question)


def _tie_breaker(raw: Any, own_name: str) -> TieBreaker:
    """``tie_breaker: helpfulness`` (a reward model), ``{reward_model: x}`` or ``{criterion: y}``."""
    if isinstance(raw, str):
        raw = {"reward_model": raw}
    m = _mapping(raw, "tie_breaker", ("criterion", "reward_model"))
    if len(m) != 1:
        raise InvalidArgument("tie_breaker", "give one of criterion or reward_model")
    kind, name = next(iter(m.items()))
    validate_name(name, f"tie_breaker.{kind}")
    if kind == "criterion" and name == own_name:
        raise InvalidArgument("tie_breaker.criterion", "a criterion cannot break its own ties; name another one")
    return TieBreaker(kind=str(kind), name=name)


__all__ = [
    "COUNT_RULES", "CONTAINS_RULES", "Criterion", "JudgeSpec", "MODES", "REGEX_FLAGS", "REGEX_RULES", "RULE_NAMES",
    "RewardSpec", "Rule", "TieBreaker", "parse_criterion", "regex_flags", "split_ref",
]
