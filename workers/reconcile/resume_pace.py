"""How many suspended flow runs one tick resumes: as many as Prefect accepts, found by trying.

A fixed cap (20 a tick) left the last of 5,000 flows whose jobs ended together resuming 40
minutes later, and a cap high enough for that would hammer a Prefect server that is already
struggling. So the budget grows and backs off as TCP finds a link's rate: a tick that used its
whole budget with no refusal, within the beat's interval, doubles it (up to a ceiling); a tick
that met a 429 or a 5xx (and stops resuming for that tick), or whose resumes took more than two
intervals (Prefect answers, but slowly, and the tick's other work waits), halves it. The resumes of one tick
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
    # Resumes that take longer than this are a server at its limit: no growth (twice this: halve).
    target_seconds: float = 10.0

    def __post_init__(self) -> None:
        self.ceiling = max(self.ceiling, self.budget)
        self.budget = max(1, self.budget)

    def settle(self, issued: int, throttled: bool, seconds: float = 0.0) -> None:
        """What this tick's resumes met, and how long they took, decides the next tick's budget."""
        if throttled or seconds > 2 * self.target_seconds:
            self.budget = max(1, self.budget // 2)
            logger.warning(
                "Prefect %s; next tick resumes at most %s",
                "refused resumes under load" if throttled else f"took {seconds:.1f}s to resume {issued}",
                self.budget,
            )
        elif issued >= self.budget and self.budget < self.ceiling and seconds <= self.target_seconds:
            self.budget = min(self.ceiling, self.budget * 2)
