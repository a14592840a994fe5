"""Invalid rows: the error that names them and the report that counts them when they are dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("logitsam.data")

ON_INVALID = ("error", "drop")

# Every reason a row can be invalid, with what it means. Drop counts use these names.
REASONS = {
    "invalid_json": "the line is not valid JSON",
    "wrong_type": "a field (or the row itself) has the wrong type",
    "missing_field": "a required field is absent, null or an empty message list",
    "empty_response": "a response is empty or whitespace only",
    "identical_responses": "chosen and rejected are the same text",
    "unparseable_transcript": "an HH transcript has no shared prompt ending in '\\n\\nAssistant:'",
    "malformed_messages": "a message list is not user/assistant turns ending in an assistant reply",
    "chat_template_error": "the tokenizer's chat template refused the prompt messages",
    "prompt_too_long": "the prompt alone fills max_length, so keep_start truncation leaves no completion token",
}


class DataError(ValueError):
    """A mistake in the user's data: a missing or unreadable source, an empty split, no valid pairs.

    The message names the source (and the row and field, where there is one); the CLI prints it
    as one line without a traceback.
    """


class InvalidRowError(DataError):
    """A row that fails validation, named by source, 0-based row and field."""

    def __init__(self, source: str, row: int, field: str | None, reason: str, detail: str):
        self.source, self.row, self.field, self.reason, self.detail = source, row, field, reason, detail
        where = f"{source}: row {row}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {detail} [{reason}]")


@dataclass
class DropReport:
    """What happened to the rows of one source: how many were read, and why any were dropped.

    With ``on_invalid="error"`` the first invalid row raises `InvalidRowError`; with ``"drop"`` it is
    counted under its reason (see `REASONS`), its row number is kept (the first ``max_listed`` per
    reason) and it is logged at DEBUG on the ``logitsam.data`` logger. `log_summary` logs the totals.

    Attributes:
        source: the file path or dataset id, as it appears in error messages.
        on_invalid: "error" or "drop".
        rows_read: rows read from the source (after the split slice and ``max_samples``).
        counts: dropped rows per reason.
        first_rows: the first ``max_listed`` dropped 0-based row numbers per reason.
    """

    source: str
    on_invalid: str = "error"
    rows_read: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)
    max_listed: int = 5

    def __post_init__(self):
        if self.on_invalid not in ON_INVALID:
            raise DataError(f"on_invalid={self.on_invalid!r}; allowed: {', '.join(ON_INVALID)}")

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        return self.rows_read - self.dropped

    def reject(self, row: int, field: str | None, reason: str, detail: str) -> None:
        """Raise for ``on_invalid="error"``; otherwise count, remember and log the row."""
        assert reason in REASONS, reason
        error = InvalidRowError(self.source, row, field, reason, detail)
        if self.on_invalid == "error":
            raise error
        self.counts[reason] = self.counts.get(reason, 0) + 1
        listed = self.first_rows.setdefault(reason, [])
        if len(listed) < self.max_listed:
            listed.append(row)
        logger.debug("dropped %s", error)

    def log_summary(self) -> None:
        """One line on the ``logitsam.data`` logger: WARNING when rows were dropped, INFO otherwise."""
        if self.dropped:
            logger.warning("%s", self)
        else:
            logger.info("%s", self)

    def __str__(self) -> str:
        head = f"{self.source}: kept {self.kept} of {self.rows_read} rows"
        if not self.dropped:
            return head
        parts = [
            f"{reason}={n} (rows {', '.join(map(str, self.first_rows[reason]))}"
            + (", ...)" if n > len(self.first_rows[reason]) else ")")
            for reason, n in sorted(self.counts.items())
        ]
        return f"{head}; dropped {self.dropped}: " + "; ".join(parts)
