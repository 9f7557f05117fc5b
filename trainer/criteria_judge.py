"""The criteria a held-out record was built from, as the policy gate's judge of the rule (the criteria guard).

Criteria feedback records name the criteria that ranked their replies (``criterion:name@version`` among
their ``source_event_ids``).  The gate's guards reply to held-out records' prompts; this module reads
those records' criteria from the criteria store once per version (a recorded version never changes)
and says whether a reply breaks one of their rules, so a policy version that breaks the criteria it is
trained on more often than the reference policy is not served (``DPOSettings.criteria_guard``).  Rule
criteria only: a reward or judge criterion needs a served model, which the scorer has and the trainer
does not load for this.
"""

from __future__ import annotations

import logging
from typing import Any

from services.criteria import Criterion
from services.criteria_eval import evaluate, record_criteria
from services.criteria_store import CriteriaStore, CriterionNotFound
from services.errors import PrefstreamError
from services.schemas import PreferenceRecord

log = logging.getLogger(__name__)


def any_broken(broken: dict[str, bool] | None) -> bool | None:
    """Whether any criterion of :meth:`RecordCriteria.broken`'s answer is broken (None stays None)."""
    return None if broken is None else any(broken.values())


class RecordCriteria:
    """``breaks(record, reply)``: does the reply break a rule criterion the record was built from?"""

    def __init__(self, store: CriteriaStore) -> None:
        self.store = store
        self._known: dict[tuple[str, str], Criterion | None] = {}  # (project, name@version) -> rules or None
        self._warned: set[str] = set()

    @classmethod
    def of(cls, registry: Any) -> RecordCriteria:
        """The criteria stored beside the registry the gate publishes to (same Redis, same namespace)."""
        return cls(CriteriaStore(registry.redis, namespace=registry.namespace))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            log.warning("criteria guard: %s", message)
            self._warned.add(message)

    def _rules(self, project: str, ref: str) -> Criterion | None:
        key = (project, ref)
        if key not in self._known:
            try:
                c = self.store.get(project, ref)
            except CriterionNotFound:
                self._warn_once(f"criterion {project}/{ref} is not stored (deleted?); its records are not judged")
                c = None
            except (OSError, ConnectionError, PrefstreamError) as e:
                self._warn_once(f"the criteria store cannot be read ({e}); judged again at the next checkpoint")
                return None  # not cached: a store that comes back is read again
            self._known[key] = c if c is not None and c.kind == "rules" else None
        return self._known[key]

    def _record_rules(self, record: PreferenceRecord) -> list[Criterion]:
        return [c for ref in record_criteria(record.source_event_ids)
                if (c := self._rules(record.project, ref)) is not None]

    def word_limit(self, record: PreferenceRecord) -> int | None:
        """The most words the record's rule criteria allow a reply (their smallest ``max_words``; a reply over it
        :meth:`breaks` them), None when none of them limits words."""
        limits = [int(r.value) for c in self._record_rules(record)  # type: ignore[call-overload]
                  for r in c.rules if r.kind == "max_words"]
        return min(limits) if limits else None

    def broken(self, record: PreferenceRecord, reply: str) -> dict[str, bool] | None:
        """Per rule criterion the record names (``name@version``), whether ``reply`` fails it (a score below 1);
        None when the record names no rule criterion (or none can be read now)."""
        rules = self._record_rules(record)
        if not rules:
            return None
        return {f"{c.name}@{c.version}": evaluate(c, record.prompt, [reply])[0].score < 1.0 for c in rules}

    def breaks(self, record: PreferenceRecord, reply: str) -> bool | None:
        """True when ``reply`` fails one of the record's rule criteria, False when it keeps them all, None when
        the record names no rule criterion (or none can be read now)."""
        return any_broken(self.broken(record, reply))


__all__ = ["RecordCriteria", "any_broken"]
