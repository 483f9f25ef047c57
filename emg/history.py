"""State histories: typed entries appended to a JSON list inside the UPDATE that changes the state.

Appending in SQL (not `row.history + [entry]` in Python) keeps the history exact when two writers
race: the entry lands only if, and in the same statement as, the guarded change it describes.
"""

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from django.db import models
from django.db.models import F, Func, QuerySet, Value
from django.db.models.functions import Cast
from django.utils import timezone


@dataclass(frozen=True)
class HistoryEntry:
    """One change of state: what it became, why, and when."""

    state: str
    detail: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "state": str(self.state), "at": self.at.isoformat()}


def entry(state: str, detail: str, now: datetime | None = None) -> HistoryEntry:
    """The entry of a change made at `now` (now, if not given), its detail cut to what a history keeps."""
    return HistoryEntry(state, detail[:2000], now or timezone.now())


class AppendToHistory(Func):
    """`history || '[entry]'` on PostgreSQL, `json_insert(history, '$[#]', entry, ...)` on SQLite."""

    output_field = models.JSONField()

    def __init__(self, *entries: HistoryEntry, column: str = "history") -> None:
        self.count = len(entries)
        super().__init__(
            F(column), Cast(Value(json.dumps([entry.to_json() for entry in entries])), output_field=models.JSONField())
        )

    def as_sql(
        self,
        compiler: Any,
        connection: Any,
        function: str | None = None,
        template: str | None = None,
        arg_joiner: str | None = None,
        **extra_context: Any,
    ) -> Any:
        return super().as_sql(
            compiler,
            connection,
            function=function,
            template=template or "(%(expressions)s)",
            arg_joiner=arg_joiner or " || ",
            **extra_context,
        )

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        column, entries = self.source_expressions
        column_sql, column_params = compiler.compile(column)
        entries_sql, entries_params = compiler.compile(entries)
        # json(...) is '[{...}, ...]'; its '$[i]' is the i-th entry itself.
        pairs = ", ".join(f"'$[#]', json({entries_sql}) -> '$[{i}]'" for i in range(self.count))
        return f"json_insert({column_sql}, {pairs})", (*column_params, *(entries_params * self.count))


def apply_transition(
    rows: QuerySet[Any],
    what: str,
    step: str,
    entries: HistoryEntry | list[HistoryEntry] | None,
    logger: logging.Logger,
    **changes: Any,
) -> bool:
    """One guarded UPDATE of one row (`rows` holds the guard) with its history entries; whether it
    applied. A change that no longer applies is logged and skipped, never forced."""
    entries = [entries] if isinstance(entries, HistoryEntry) else entries or []
    if entries:
        changes["history"] = AppendToHistory(*entries)
    applied: bool = rows.update(**changes, updated_at=timezone.now()) == 1
    if not applied:
        logger.info("%s: %s skipped, the row has moved on since it was read", what, step)
    return applied
