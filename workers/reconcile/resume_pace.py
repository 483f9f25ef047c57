"""How many suspended flow runs one tick resumes: as many as Prefect accepts, found by trying.

A fixed cap (20 a tick) left the last of 5,000 flows whose jobs ended together resuming 40
minutes later, and a cap high enough for that would hammer a Prefect server that is already
struggling. So the budget is additive-increase, multiplicative-decrease, as TCP finds a link's
rate: a tick that used its whole budget with no refusal doubles it (up to a ceiling); a tick
that met a 429 or a 5xx halves it, and stops resuming for that tick. The resumes of one tick
are issued from a small pool of threads, in order of their oldest wait.
"""

import logging
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)


def is_throttling(error: BaseException) -> bool:
    """Prefect refusing for load (429, 5xx) or not answering in time: slow down."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, (httpx.TimeoutException, httpx.NetworkError))


@dataclass
class ResumePace:
    budget: int
    ceiling: int
    concurrency: int = 8

    def __post_init__(self) -> None:
        self.ceiling = max(self.ceiling, self.budget)
        self.budget = max(1, self.budget)

    def settle(self, issued: int, throttled: bool) -> None:
        """What this tick's resumes met decides the next tick's budget."""
        if throttled:
            self.budget = max(1, self.budget // 2)
            logger.warning("Prefect refused resumes under load; next tick resumes at most %s", self.budget)
        elif issued >= self.budget and self.budget < self.ceiling:
            self.budget = min(self.ceiling, self.budget * 2)
