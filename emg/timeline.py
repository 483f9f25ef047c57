"""A request's life as an inline SVG for the admin: its status over time, and each of its jobs'
phases (declared, pending, running) with every retry, so a queued-two-days, ran-four, retried-once
request reads at a glance. Built from the state histories alone; no JavaScript.

Times in the histories are when the reconciler (or the flow) saw a change, to a tick's precision.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from emg.models import AnalysisRequest, ClusterJob, ClusterJobState
from slurm_adapter import JobState

# Phase -> fill colour. Ended phases are drawn as a mark at the end, in the outcome's colour.
COLOURS = {
    "PENDING": "#b0b0b0",
    "RUNNING": "#3b7dd8",
    "WAITING": "#e0a030",
    "COMPLETED": "#2e9e4f",
    "FAILED": "#d0342c",
    "CANCELLED": "#777777",
    "declared": "#d9d9d9",
    "pending": "#e0a030",
    "running": "#3b7dd8",
    "ended ok": "#2e9e4f",
    "ended badly": "#d0342c",
}
JOB_PHASES = {
    ClusterJobState.DECLARED: "declared",
    "CLAIMED": "declared",
    "SUBMIT_ERROR": "declared",
    JobState.SUBMITTED: "pending",
    JobState.PENDING: "pending",
    JobState.RUNNING: "running",
    JobState.SUSPENDED: "running",
}
ENDED = {state.value for state in JobState if state.is_final} | {ClusterJobState.REJECTED}

WIDTH, LABEL_WIDTH, ROW_HEIGHT, BAR_HEIGHT, AXIS_HEIGHT = 960, 220, 26, 16, 24


@dataclass(frozen=True)
class Segment:
    phase: str
    start: datetime
    end: datetime
    detail: str = ""

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


@dataclass(frozen=True)
class Row:
    label: str
    segments: list[Segment]
    marks: list[tuple[datetime, str, str]]  # (when, colour, what)


def when(entry: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(entry["at"])
    except (KeyError, TypeError, ValueError):
        return None


def human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            rest = seconds % size
            sub = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            return f"{seconds // size}{unit}" + (f" {rest // sub[1]}{sub[0]}" if rest // sub[1] else "")
    return f"{seconds}s"


def request_row(request: AnalysisRequest, now: datetime) -> Row:
    segments, marks = [], []
    phase, since, detail = "PENDING", request.created_at, ""
    for entry in request.history if isinstance(request.history, list) else ():
        at, state = when(entry), entry.get("state") if isinstance(entry, dict) else None
        if at is None or not state:
            continue
        if state != phase:
            segments.append(Segment(phase, since, at, detail))
            phase, since = state, at
        detail = entry.get("detail", "")
        if "re-run" in detail:
            marks.append((at, COLOURS["FAILED"], detail))
    if phase in AnalysisRequest.FINAL_STATUSES:
        marks.append((since, COLOURS.get(phase, "#000"), f"{phase} {detail}"))
    else:
        segments.append(Segment(phase, since, now, detail))
    return Row(f"request #{request.id} (gen {request.generation})", segments, marks)


def job_row(label: str, job: ClusterJob, now: datetime) -> Row:
    segments, marks = [], []
    phase, since, detail = "declared", job.created_at, "declared"
    for entry in job.history if isinstance(job.history, list) else ():
        at, state = when(entry), entry.get("state") if isinstance(entry, dict) else None
        if at is None or not state:
            continue
        if state in ENDED:
            segments.append(Segment(phase, since, at, detail))
            good = state == JobState.COMPLETED
            marks.append((at, COLOURS["ended ok" if good else "ended badly"], f"{state}: {entry.get('detail', '')}"))
            phase, since, detail = "", at, ""
            continue
        new_phase = JOB_PHASES.get(state)
        if new_phase is None:
            continue  # UNREADABLE and the like: the phase goes on
        if new_phase != phase:
            if phase:
                segments.append(Segment(phase, since, at, detail))
            phase, since = new_phase, at
        detail = entry.get("detail", "")
        if state == ClusterJobState.DECLARED:
            marks.append((at, COLOURS["FAILED"], f"retried: {detail}"))
    if phase:
        segments.append(Segment(phase, since, now, detail))
    return Row(label, [s for s in segments if s.end >= s.start], marks)


def rows_of(request: AnalysisRequest, now: datetime) -> list[Row]:
    rows = [request_row(request, now)]
    for wait in request.waits.select_related("job").order_by("created_at", "id"):
        rows.append(job_row(f"{wait.step}: job #{wait.job_id}", wait.job, now))
    return rows


def svg(rows: list[Row], now: datetime) -> SafeString:
    starts = [s.start for row in rows for s in row.segments] + [m[0] for row in rows for m in row.marks]
    ends = [s.end for row in rows for s in row.segments] + [m[0] for row in rows for m in row.marks]
    if not starts:
        return mark_safe("-")
    first, last = min(starts), max(ends)
    span = max((last - first).total_seconds(), 1.0)
    plot = WIDTH - LABEL_WIDTH - 10

    def x(moment: datetime) -> float:
        return round(LABEL_WIDTH + plot * (moment - first).total_seconds() / span, 1)

    height = AXIS_HEIGHT + ROW_HEIGHT * len(rows) + 30
    # Scaled to the page's width (the admin's field column is narrower than WIDTH), never past it.
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="emg-timeline" viewBox="0 0 {WIDTH} {height}" '
        f'width="100%" style="max-width: {WIDTH}px" role="img" aria-label="timeline" font-family="sans-serif" '
        f'font-size="11">'
    ]
    for tick in range(5):
        moment = first + timedelta(seconds=span * tick / 4)
        parts.append(
            f'<line x1="{x(moment)}" y1="{AXIS_HEIGHT - 4}" x2="{x(moment)}" y2="{height - 30}" stroke="#eee"/>'
        )
        anchor = {0: "start", 4: "end"}.get(tick, "middle")
        parts.append(f'<text x="{x(moment)}" y="12" text-anchor="{anchor}">{escape(f"{moment:%m-%d %H:%M:%S}")}</text>')
    for index, row in enumerate(rows):
        y = AXIS_HEIGHT + index * ROW_HEIGHT
        parts.append(f'<text x="4" y="{y + BAR_HEIGHT - 4}">{escape(row.label[:36])}</text>')
        for segment in row.segments:
            width = max(x(segment.end) - x(segment.start), 1)
            label = f"{segment.phase} {human(segment.duration)}"
            parts.append(
                f'<rect x="{x(segment.start)}" y="{y}" width="{width}" height="{BAR_HEIGHT}" '
                f'fill="{COLOURS.get(segment.phase, "#999")}" class="phase-{escape(segment.phase.replace(" ", "-"))}">'
                f"<title>{escape(label)}: {escape(segment.detail[:200])}</title></rect>"
            )
            if width > 7 * len(label):
                parts.append(
                    f'<text x="{x(segment.start) + 3}" y="{y + BAR_HEIGHT - 4}" fill="#fff">{escape(label)}</text>'
                )
        for moment, colour, what in row.marks:
            parts.append(
                f'<rect x="{x(moment) - 2}" y="{y - 2}" width="4" height="{BAR_HEIGHT + 4}" fill="{colour}">'
                f"<title>{escape(what[:300])}</title></rect>"
            )
    legend_y = height - 12
    for n, phase in enumerate(("declared", "pending", "running", "WAITING", "ended ok", "ended badly")):
        parts.append(
            f'<rect x="{LABEL_WIDTH + n * 110}" y="{legend_y - 9}" width="10" height="10" '
            f'fill="{COLOURS[phase]}"/><text x="{LABEL_WIDTH + n * 110 + 14}" y="{legend_y}">{phase}</text>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every text in it went through escape()


def timeline(request: AnalysisRequest, now: datetime) -> SafeString:
    return svg(rows_of(request, now), now)
