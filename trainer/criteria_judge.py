"""The criteria a guard prompt names, as the policy gate's judge of the rule (the criteria guard).

Criteria feedback records name the criteria that ranked their replies (``criterion:name@version`` among
their ``source_event_ids``); a guard set names them per prompt (trainer/guard_set.py).  The gate's guards
reply to those prompts (:class:`~trainer.guard_set.GuardPrompt`); this module reads their criteria from the
criteria store once per version (a recorded version never changes) and says whether a reply breaks one of
their rules, so a policy version that breaks the criteria it is
trained on more often than the reference policy is not served (``DPOSettings.criteria_guard``).  Rule
criteria only: a reward or judge criterion needs a served model, which the scorer has and the trainer
does not load for this.
"""

from __future__ import annotations

import logging
from typing import Any

from services.criteria import Criterion
from services.criteria_eval import evaluate
from services.criteria_store import CriteriaStore, CriterionNotFound
from services.errors import PrefstreamError
from trainer.guard_set import GuardPrompt

log = logging.getLogger(__name__)


def any_broken(broken: dict[str, bool] | None) -> bool | None:
    """Whether any criterion of :meth:`RecordCriteria.broken`'s answer is broken (None stays None)."""
    return None if broken is None else any(broken.values())


class RecordCriteria:
    """``breaks(prompt, reply)``: does the reply break a rule criterion the guard prompt names?"""

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
                self._warn_once(f"criterion {project}/{ref} is not stored (deleted?); replies to the prompts naming it are not judged by it")
                c = None
            except (OSError, ConnectionError, PrefstreamError) as e:
                self._warn_once(f"the criteria store cannot be read ({e}); judged again at the next checkpoint")
                return None  # not cached: a store that comes back is read again
            self._known[key] = c if c is not None and c.kind == "rules" else None
        return self._known[key]

    def _rules_of(self, item: GuardPrompt) -> list[Criterion]:
        return [c for ref in item.criteria if (c := self._rules(item.project, ref)) is not None]

    def word_limit(self, item: GuardPrompt) -> int | None:
        """The most words the prompt's rule criteria allow a reply (their smallest ``max_words``; a reply over it
        :meth:`breaks` them), None when none of them limits words."""
        limits = [int(r.value) for c in self._rules_of(item)  # type: ignore[call-overload]
                  for r in c.rules if r.kind == "max_words"]
        return min(limits) if limits else None

    def broken(self, item: GuardPrompt, reply: str) -> dict[str, bool] | None:
        """Per rule criterion the prompt names (``name@version``), whether ``reply`` fails it (a score below 1);
        None when it names no rule criterion (or none can be read now)."""
        rules = self._rules_of(item)
        if not rules:
            return None
        return {f"{c.name}@{c.version}": evaluate(c, item.prompt, [reply])[0].score < 1.0 for c in rules}

    def breaks(self, item: GuardPrompt, reply: str) -> bool | None:
        """True when ``reply`` fails one of the prompt's rule criteria, False when it keeps them all, None when
        it names no rule criterion (or none can be read now)."""
        return any_broken(self.broken(item, reply))


__all__ = ["RecordCriteria", "any_broken"]
