"""The operators' view: what each request and cluster job is doing, and the three ways to step in.

Rows are written by flows and the reconciler, never by hand: state fields are read-only
here, and the actions call the models' own operations.
"""

import shlex
from contextvars import ContextVar
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from emg import timeline as timelines
from emg.efficiency import efficiency, largest_task, percent, summarise, task_shares
from emg.models import (
    AnalysisRequest,
    ClusterJob,
    JobWait,
    OutboxEvent,
    ReconcileTick,
    RunQC,
    Study,
    StudyQC,
    StudyReport,
    TendedRun,
)
from emg.pipeline_options import OPTIONS
from slurm_adapter import JobSpec, tail_log
from slurm_adapter.spec import build_script

LOG_TAIL_LINES = 40
# The job list filtered to one request's jobs; allowed explicitly in ClusterJobAdmin.lookup_allowed.
JOBS_OF_REQUEST = "waits__request__id__exact"


def flow_run_url(flow_run_id) -> str:
    return f"{settings.PREFECT_UI_URL}/runs/flow-run/{flow_run_id}"


def change_link(obj) -> str:
    url = reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, obj)


def preformatted(text: str) -> str:
    # Wrapped, so a long command line or log line stays on the page.
    return format_html('<pre style="white-space: pre-wrap">{}</pre>', text)


def html_table(rows, headers: list[str] | None = None) -> str:
    if not rows:
        return "-"
    head = ""
    if headers:
        head = format_html("<thead><tr>{}</tr></thead>", format_html_join("", "<th>{}</th>", ((h,) for h in headers)))
    body = format_html_join(
        "", "<tr>{}</tr>", ((format_html_join("", "<td>{}</td>", ((cell,) for cell in row)),) for row in rows)
    )
    return format_html("<table>{}<tbody>{}</tbody></table>", head, body)


def history_html(history) -> str:
    """A state history (emg.history entries) as a table, oldest first."""
    # ISO times to the second, in UTC like the rest of the record.
    rows = [
        (entry.get("at", "")[:19].replace("T", " "), entry.get("state", ""), entry.get("detail", ""))
        for entry in history
    ]
    return html_table(rows, ["at", "state", "detail"])


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return timelines.human(timedelta(seconds=seconds))


def flagged(text: str, flag: bool) -> str:
    return format_html('<strong style="color:#d0342c">{} (under-used)</strong>', text) if flag else text


def efficiency_rows(job: ClusterJob) -> list[tuple]:
    rows = trace_efficiency_rows(job)
    found = efficiency(job.usage)
    if found is None:
        return rows
    usage, flags = found.usage, found.flags
    return [
        (
            "CPU",
            flagged(
                f"{percent(found.cpu)}: {duration(usage.get('cpu_s'))} CPU time of {usage.get('cpus')} CPU(s) "
                f"x {duration(usage.get('elapsed_s'))}",
                "CPU" in flags,
            ),
        ),
        (
            "memory",
            flagged(
                f"{percent(found.memory)}: peak {usage.get('max_rss_mb') or 0:.0f} MB of "
                f"{usage.get('requested_memory_mb') or 0:.0f} MB requested",
                "memory" in flags,
            ),
        ),
        (
            "time",
            flagged(
                f"{percent(found.time)}: {duration(usage.get('elapsed_s'))} of a "
                f"{duration(usage.get('time_limit_s'))} limit",
                "time" in flags,
            ),
        ),
        *rows,
    ]


def trace_efficiency_rows(job: ClusterJob) -> list[tuple]:
    """From the Nextflow trace: the task whose peak memory the request must cover, and the busiest task's CPU."""
    shares = task_shares(job.trace, job.spec)
    largest = largest_task(shares)
    busy = [share for share in shares if share.cpu is not None]
    rows = []
    threshold = settings.EMG_EFFICIENCY_THRESHOLD
    if largest is not None:
        rows.append(
            (
                "largest task's memory (trace)",
                flagged(f"{percent(largest.memory)} of the request: {largest.name}", (largest.memory or 0) < threshold),
            )
        )
    if busy:
        busiest = max(busy, key=lambda share: share.cpu or 0.0)
        rows.append(
            (
                "busiest task's CPU (trace)",
                flagged(
                    f"{percent(busiest.cpu)} of {job.spec.get('cpus') or 1} CPU(s): {busiest.name}",
                    (busiest.cpu or 0) < threshold,
                ),
            )
        )
    return rows


TRACE_SORT: ContextVar[tuple[str, bool]] = ContextVar("trace_sort", default=("", False))


def trace_value(column: str, value) -> str:
    """A trace figure as a person reads it: sizes in MB, times as durations, counts as they are."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if column.endswith("_bytes"):
            return f"{value / 1024 / 1024:.1f} MB"
        if column.endswith("_s"):
            return duration(value)
        if column.endswith("_percent"):
            return f"{value:.1f}%"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {item}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def sort_key(value) -> tuple:
    """Numbers by value, text alphabetically, missing values last whichever the order."""
    if value is None or value == "":
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value).lower())


def sortable_tasks(tasks: list[dict]) -> str:
    columns = list(dict.fromkeys(column for row in tasks for column in row))
    column, descending = TRACE_SORT.get()
    if column in columns:
        present = [row for row in tasks if row.get(column) not in (None, "")]
        missing = [row for row in tasks if row.get(column) in (None, "")]
        tasks = sorted(present, key=lambda row: sort_key(row.get(column)), reverse=descending) + missing
    headers = []
    for name in columns:
        order = "asc" if name != column or descending else "desc"
        arrow = ("▼" if descending else "▲") if name == column else ""
        query = urlencode({"trace_sort": name, "trace_order": order})
        headers.append(format_html('<a href="?{}#trace">{}{}</a>', query, name, arrow))
    head = format_html_join("", "<th>{}</th>", ((header,) for header in headers))
    body = format_html_join(
        "",
        "<tr>{}</tr>",
        (
            (format_html_join("", "<td>{}</td>", ((trace_value(name, row.get(name)),) for name in columns)),)
            for row in tasks
        ),
    )
    return format_html(
        '<table id="trace" class="trace-tasks"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>', head, body
    )


def apply_to_each(modeladmin: admin.ModelAdmin, request, queryset, operation, describe, verb: str) -> None:
    """Run a domain operation on each selected row; say which were done and why others were refused."""
    done, refused = [], []
    for obj in queryset:
        try:
            result = operation(obj)
        except ValidationError as error:
            refused.append(" ".join(error.messages))
        else:
            done.append(describe(obj, result))
    if done:
        modeladmin.message_user(request, f"{verb}: {', '.join(done)}", messages.SUCCESS)
    if refused:
        modeladmin.message_user(request, f"Not {verb.lower()}: {'; '.join(refused)}", messages.WARNING)


class GuardedActionsAdmin(admin.ModelAdmin):
    """Actions that each declare a permission (`@admin.action(permissions=[...])`), refused with a 403.

    Django leaves an action the user may not run out of the list, but a POST naming it anyway is
    answered with the list page again, as if nothing was asked: here it is a PermissionDenied, so a
    view-only staff user, or a forged form, is told no."""

    def changelist_view(self, request, extra_context=None):
        name = request.POST.get("action") if request.method == "POST" else None
        if name and name not in self.get_actions(request):
            declared = {getattr(action, "__name__", str(action)) for action in self.actions or ()}
            if name in declared or name == "delete_selected":
                raise PermissionDenied(f"You may not run the action {name!r} on {self.opts.verbose_name_plural}.")
        return super().changelist_view(request, extra_context)

    def save_model(self, request, obj, form, change):
        if change:
            # Only what the form changed: a full-row write from a form read minutes ago would put
            # back whatever the reconciler wrote since (models' save() already spares the state).
            changed = [name for name in form.changed_data if name in {f.name for f in obj._meta.concrete_fields}]
            obj.save(update_fields=changed)
        else:
            obj.save()


def has_model_permission(request, codename: str) -> bool:
    return request.user.has_perm(f"emg.{codename}")


class PipelineOptionsField(forms.JSONField):
    """JSON that can always be answered with a form error: too deep or too long input included."""

    MAX_LENGTH = 10_000

    def to_python(self, value):
        if isinstance(value, str) and len(value) > self.MAX_LENGTH:
            raise ValidationError(f"Pipeline options are at most {self.MAX_LENGTH} characters of JSON.", code="invalid")
        try:
            return super().to_python(value)
        except RecursionError:
            raise ValidationError("Pipeline options are nested too deeply to be read.", code="invalid") from None

    def bound_data(self, data, initial):
        try:
            return super().bound_data(data, initial)
        except RecursionError:
            return forms.fields.InvalidJSONInput(data)


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = ["accession", "title", "process_on_create", "created_at"]
    list_filter = ["process_on_create"]
    search_fields = ["accession", "title"]


class RunQCInline(admin.TabularInline):
    model = RunQC
    fields = ("run", "passed", "failed_because", "reads", "bases", "mean_quality", "q30_percent", "gc_percent", "job")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(StudyReport)
class StudyReportAdmin(admin.ModelAdmin):
    """Adding one asks for its study to be processed (flows.process_study); the flow fills it in."""

    list_display = ["study", "requested_at", "finished_at", "request", "qc"]
    list_filter = ["finished_at"]
    search_fields = ["study__accession"]
    autocomplete_fields = ["study"]

    def get_readonly_fields(self, request, obj=None):
        # The study is chosen when the report is asked for; everything else is the flow's.
        written_by_the_flow = ["requested_at", "flow_run_id", "request", "qc", "finished_at", "summary"]
        return ["study", *written_by_the_flow] if obj else written_by_the_flow


@admin.register(StudyQC)
class StudyQCAdmin(admin.ModelAdmin):
    """Written by the QC flow only (emg.qc): operators read it here."""

    list_display = ["study", "fetched_at", "finished_at", "runs_passed", "total_reads", "flow_run_id"]
    list_filter = ["finished_at"]
    search_fields = ["study__accession"]
    readonly_fields = [field.name for field in StudyQC._meta.fields]
    inlines = [RunQCInline]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class JobWaitInline(admin.TabularInline):
    model = JobWait
    extra = 0
    can_delete = False
    fields = [
        "step",
        "job_link",
        "job_state",
        "slurm_job_id",
        "suspensions",
        "created_at",
        "released_at",
        "history_table",
    ]
    readonly_fields = fields  # type: ignore[assignment]  # the stubs type fields wider than readonly_fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("job")

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="job")
    def job_link(self, wait: JobWait):
        return change_link(wait.job)

    @admin.display(description="state")
    def job_state(self, wait: JobWait):
        return wait.job.state

    @admin.display(description="Slurm id")
    def slurm_job_id(self, wait: JobWait):
        return wait.job.slurm_job_id or "-"

    @admin.display(description="history")
    def history_table(self, wait: JobWait):
        return history_html(wait.history)


@admin.register(AnalysisRequest)
class AnalysisRequestAdmin(GuardedActionsAdmin):
    list_display = [
        "id",
        "study",
        "status",
        "current_step",
        "short_reason",
        "generation",
        "flow_run_link",
        "jobs_link",
        "created_at",
    ]
    list_filter = ["status"]
    list_select_related = ["study"]
    search_fields = ["study__accession", "waits__job__slurm_job_id"]
    readonly_fields = [
        "status",
        "current_step",
        "status_reason",
        "generation",
        "flow_run_link",
        "jobs_link",
        "cancel_requested_at",
        "created_at",
        "updated_at",
        "finished_at",
        "timeline",
        "efficiency_report",
    ]
    fields = ["study", "pipeline_options", *readonly_fields]
    inlines = [JobWaitInline]
    actions = ["cancel", "rerun"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(job_count=Count("waits"))

    def get_readonly_fields(self, request, obj=None):
        # A flow reads the study and options again on every resume: an edit while it runs would be
        # picked up halfway through. They can be changed once the request has ended, then re-run.
        if obj is not None and not obj.is_final:
            return ["study", "pipeline_options", *self.readonly_fields]
        return self.readonly_fields

    def has_cancel_permission(self, request):
        return has_model_permission(request, "cancel_analysisrequest")

    def has_rerun_permission(self, request):
        return has_model_permission(request, "rerun_analysisrequest")

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "pipeline_options":
            kwargs["form_class"] = PipelineOptionsField
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name in ("study", "pipeline_options") and field is not None:
            # The form carries what it was shown, so `changed_data` (what a save writes) is what
            # this operator changed, not whatever differs from a row someone else edited since.
            field.show_hidden_initial = True
        if db_field.name == "pipeline_options" and field is not None:
            field.help_text = "A JSON object ({} for the defaults). Options: " + "; ".join(
                f"{option.name} ({option.pipeline}, {option.type.__name__}"
                + (f" {option.minimum}..{option.maximum}" if option.minimum is not None else "")
                + (", odd" if option.odd else "")
                + f", default {option.default})"
                for option in OPTIONS.values()
            )
        return field

    @admin.display(description="timeline")
    def timeline(self, obj: AnalysisRequest):
        return timelines.timeline(obj, timezone.now()) if obj.pk else "-"

    @admin.display(description="efficiency (used of requested)")
    def efficiency_report(self, obj: AnalysisRequest):
        rows = []
        for wait in obj.waits.select_related("job").order_by("created_at", "id") if obj.pk else ():
            largest = largest_task(task_shares(wait.job.trace, wait.job.spec))
            task = f"{percent(largest.memory)} ({largest.name})" if largest else "-"
            found = efficiency(wait.job.usage)
            if found is None:
                rows.append((wait.step, change_link(wait.job), "-", "-", "-", task, "no usage recorded yet"))
                continue
            rows.append(
                (
                    wait.step,
                    change_link(wait.job),
                    percent(found.cpu),
                    percent(found.memory),
                    percent(found.time),
                    task,
                    flagged(", ".join(found.flags), True) if found.flags else "ok",
                )
            )
        if not rows:
            return "-"
        summary_url = reverse("admin:emg_clusterjob_efficiency")
        return format_html(
            '{}<p><a href="{}">Efficiency of every pipeline step</a></p>',
            html_table(rows, ["step", "job", "CPU", "memory", "time", "largest task's memory (trace)", "flags"]),
            summary_url,
        )

    @admin.display(description="reason")
    def short_reason(self, obj: AnalysisRequest):
        return obj.status_reason[:80]

    @admin.display(description="Prefect flow run")
    def flow_run_link(self, obj: AnalysisRequest):
        if not obj.flow_run_id:
            return "-"
        return format_html('<a href="{}" target="_blank">{}</a>', flow_run_url(obj.flow_run_id), obj.flow_run_id)

    @admin.display(description="cluster jobs")
    def jobs_link(self, obj: AnalysisRequest):
        if not obj.job_count:  # type: ignore[attr-defined]  # annotated by get_queryset
            return "-"
        url = f"{reverse('admin:emg_clusterjob_changelist')}?{urlencode({JOBS_OF_REQUEST: obj.id})}"
        return format_html('<a href="{}">{} job(s)</a>', url, obj.job_count)  # type: ignore[attr-defined]

    @admin.action(
        description="Cancel the selected requests (their flow runs and the jobs only they need)", permissions=["cancel"]
    )
    def cancel(self, request, queryset):
        apply_to_each(
            self,
            request,
            queryset,
            request_cancel_or_refuse,
            lambda analysis, _: f"#{analysis.id}",
            "Cancellation requested",
        )

    @admin.action(
        description="Re-run the selected ended requests (new generation, new flow run)", permissions=["rerun"]
    )
    def rerun(self, request, queryset):
        apply_to_each(
            self,
            request,
            queryset,
            AnalysisRequest.rerun,
            lambda analysis, _: f"#{analysis.id} (generation {analysis.generation})",
            "Re-run",
        )


def request_cancel_or_refuse(analysis: AnalysisRequest) -> None:
    if not analysis.request_cancel():
        raise ValidationError(f"#{analysis.id} has already ended or is being cancelled")


class UnreadableFilter(admin.SimpleListFilter):
    """The jobs whose Slurm state we cannot read: polled on, and an operator's to look at."""

    title = "readable by us"
    parameter_name = "unreadable"

    def lookups(self, request, model_admin):
        return [("yes", "state unreadable"), ("no", "readable")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.exclude(unreadable_state="")
        if self.value() == "no":
            return queryset.filter(unreadable_state="")
        return queryset


@admin.register(ClusterJob)
class ClusterJobAdmin(GuardedActionsAdmin):
    list_display = [
        "id",
        "name",
        "slurm_job_id",
        "state",
        "unreadable_state",
        "exit_code",
        "attempts",
        "submit_time",
        "state_checked_at",
    ]
    list_filter = ["state", UnreadableFilter]
    search_fields = ["slurm_job_id", "name", "waits__request__study__accession"]
    actions = ["resubmit"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "state",
                    "raw_state",
                    "unreadable_state",
                    "unreadable_since",
                    "submit_error",
                    "next_submit_at",
                    "slurm_job_id",
                    "exit_code",
                    "signal",
                    "attempts",
                    "retries",
                    "tag",
                    "requests",
                    "submit_time",
                    "ended_at",
                    "state_checked_at",
                    "created_at",
                    "updated_at",
                ]
            },
        ),
        ("State history", {"fields": ["history_table"]}),
        ("Job log", {"fields": ["log_path", "log_tail"]}),
        ("Script and resources", {"fields": ["resources", "command_line", "job_script", "policy_table"]}),
        ("Outputs", {"fields": ["output_dir", "manifest_table", "manifest_recorded_at"]}),
        ("Efficiency (from sacct)", {"fields": ["efficiency_table"]}),
        ("Nextflow trace", {"fields": ["trace_table"]}),
        ("Inputs", {"fields": ["input_hashes_table", "fingerprint"]}),
    ]
    readonly_fields = [field for _, options in fieldsets for field in options["fields"]]  # type: ignore[misc]

    def lookup_allowed(self, lookup, value, request=None):
        return lookup == JOBS_OF_REQUEST or super().lookup_allowed(lookup, value, request)

    def has_add_permission(self, request):
        return False

    def has_resubmit_permission(self, request):
        return has_model_permission(request, "resubmit_clusterjob")

    def get_urls(self):
        summary = path(
            "efficiency/", self.admin_site.admin_view(self.efficiency_view), name="emg_clusterjob_efficiency"
        )
        return [summary, *super().get_urls()]

    def efficiency_view(self, request):
        """Per pipeline step, what its ended jobs used of what they requested: for right-sizing."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        by_step: dict[str, list] = {}
        waits = JobWait.objects.filter(job__usage__isnull=False).select_related("job").order_by("job_id")
        seen = set()
        for wait in waits:
            if wait.job_id in seen:
                continue  # a job several requests waited for counts once
            seen.add(wait.job_id)
            found = efficiency(wait.job.usage)
            if found is not None:
                by_step.setdefault(wait.step, []).append(found)
        summaries = [summarise(step, found) for step, found in sorted(by_step.items())]
        rows = [
            (
                s.step,
                s.jobs,
                s.flagged,
                percent(s.cpu_median),
                percent(s.memory_median),
                f"{s.memory_peak_mb or 0:.0f} MB of {s.memory_requested_mb or 0:.0f} MB",
                percent(s.time_median),
                duration(s.elapsed_max_s),
            )
            for s in summaries
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Efficiency per pipeline step",
            "table": html_table(
                rows,
                [
                    "step",
                    "jobs",
                    "flagged",
                    "CPU (median)",
                    "memory (median)",
                    "peak memory (largest) of requested",
                    "time (median)",
                    "longest wall time",
                ],
            ),
            "threshold": percent(settings.EMG_EFFICIENCY_THRESHOLD),
        }
        return TemplateResponse(request, "admin/emg/efficiency.html", context)

    @admin.display(description="used of requested")
    def efficiency_table(self, job: ClusterJob):
        rows = efficiency_rows(job)
        return html_table(rows) if rows else "no usage recorded (the job has not ended, or accounting has no record)"

    @admin.display(description="waiting requests")
    def requests(self, job: ClusterJob):
        waits = job.waits.select_related("request__study").order_by("created_at")
        links = [(change_link(wait.request), wait.step) for wait in waits if wait.request]
        return format_html_join(", ", "{} at {}", links) or "-"

    @admin.display(description="state history")
    def history_table(self, job: ClusterJob):
        return history_html(job.history)

    @admin.display(description=f"last {LOG_TAIL_LINES} lines")
    def log_tail(self, job: ClusterJob):
        text = tail_log(job.log_path, LOG_TAIL_LINES) if job.log_path else ""
        return preformatted(text) if text else "-"

    @admin.display(description="resources")
    def resources(self, job: ClusterJob):
        spec = job.spec
        rows = [
            ("partition", spec.get("partition") or "default"),
            ("time limit", f"{spec.get('time_limit_minutes')} min"),
            ("memory", f"{spec.get('memory_mb')} MB"),
            ("CPUs", spec.get("cpus")),
            ("work dir", spec.get("work_dir")),
            ("extra sbatch options", " ".join(spec.get("extra_options") or []) or "-"),
            ("environment", ", ".join(sorted(spec.get("environment") or {})) or "-"),
        ]
        return html_table(rows)

    @admin.display(description="command")
    def command_line(self, job: ClusterJob):
        return preformatted(shlex.join(job.spec.get("command") or []))

    @admin.display(description="job script")
    def job_script(self, job: ClusterJob):
        return preformatted(build_script(JobSpec.from_dict(job.spec)))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # The trace table is sorted by the page's query (?trace_sort=column&trace_order=desc); a
        # read-only field is drawn without the request, so the choice is handed over in a context
        # variable, and the page is rendered before it is reset.
        token = TRACE_SORT.set((request.GET.get("trace_sort", ""), request.GET.get("trace_order") == "desc"))
        try:
            response = super().change_view(request, object_id, form_url, extra_context)
            if hasattr(response, "render"):
                response.render()
            return response
        finally:
            TRACE_SORT.reset(token)

    @admin.display(description="trace")
    def trace_table(self, job: ClusterJob):
        """The summary's figures and the tasks as a table sortable by any column; or the task rows
        of a trace recorded as a bare list."""
        trace = job.trace
        if isinstance(trace, list) and all(isinstance(row, dict) for row in trace):
            return sortable_tasks(trace)
        if not isinstance(trace, dict):
            return "-"
        parts: list[str] = []
        if trace.get("error"):
            parts.append(format_html("<p><strong>{}</strong></p>", trace["error"]))
        summary = trace.get("summary")
        if isinstance(summary, dict):
            parts.append(html_table([(name, trace_value(name, value)) for name, value in summary.items()]))
        tasks = trace.get("tasks")
        if isinstance(tasks, list) and tasks and all(isinstance(row, dict) for row in tasks):
            parts.append(sortable_tasks(tasks))
        extra = {name: value for name, value in trace.items() if name not in ("error", "summary", "tasks")}
        if extra:
            parts.append(html_table(sorted(extra.items())))
        return format_html_join("", "{}", ((part,) for part in parts)) if parts else "-"

    @admin.display(description="resubmit policy")
    def policy_table(self, job: ClusterJob):
        return html_table(sorted(job.policy.items()))

    @admin.display(description="declared outputs (sha256 recorded when the job ended)")
    def manifest_table(self, job: ClusterJob):
        manifest = job.output_manifest or {}
        return html_table([(name, manifest.get(name, "not recorded")) for name in job.outputs], ["output", "sha256"])

    @admin.display(description="input file hashes")
    def input_hashes_table(self, job: ClusterJob):
        return html_table(sorted(job.input_hashes.items()), ["input", "hash"])

    @admin.action(description="Resubmit the selected ended jobs now (as new jobs)", permissions=["resubmit"])
    def resubmit(self, request, queryset):
        apply_to_each(
            self, request, queryset, ClusterJob.resubmit, lambda job, twin: f"#{job.id} as #{twin.id}", "Resubmitted"
        )


@admin.register(JobWait)
class JobWaitAdmin(admin.ModelAdmin):
    list_display = ["flow_run_id", "step", "job", "request", "suspensions", "created_at", "released_at"]
    list_select_related = ["job", "request__study"]
    list_filter = [("released_at", admin.EmptyFieldListFilter)]
    search_fields = ["request__study__accession", "job__slurm_job_id"]
    readonly_fields = [
        "flow_run_id",
        "step",
        "job",
        "request",
        "suspensions",
        "created_at",
        "released_at",
        "history_table",
    ]

    def has_add_permission(self, request):
        return False

    @admin.display(description="history")
    def history_table(self, wait: JobWait):
        return history_html(wait.history)


@admin.register(OutboxEvent)
class OutboxEventAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "trigger",
        "changed_object",
        "run_key",
        "created_at",
        "published_at",
        "publish_attempts",
        "dispatched_at",
    ]
    list_select_related = ["content_type"]
    list_filter = ["trigger", ("dispatched_at", admin.EmptyFieldListFilter)]
    search_fields = ["trigger", "run_key"]
    readonly_fields = [
        "id",
        "trigger",
        "changed_object",
        "run_key",
        "parameters",
        "created_at",
        "published_at",
        "publish_attempts",
        "dispatched_at",
        "flow_run",
        "last_error",
    ]
    exclude = ["content_type", "object_id", "flow_run_id"]

    @admin.display(description="object")
    def changed_object(self, event: OutboxEvent):
        """The row whose change the event announces: linked if the admin shows its model."""
        model = event.content_type.model_class()
        label = f"{event.content_type.name} #{event.object_id}"
        if model is None or not self.admin_site.is_registered(model):
            return label
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[event.object_id])
        return format_html('<a href="{}">{}</a>', url, label)

    @admin.display(description="flow run")
    def flow_run(self, event: OutboxEvent):
        if event.flow_run_id is None:
            return "-"
        return format_html('<a href="{}">{}</a>', flow_run_url(event.flow_run_id), event.flow_run_id)

    def has_add_permission(self, request):
        return False


@admin.register(TendedRun)
class TendedRunAdmin(admin.ModelAdmin):
    """The flow runs without a request that the reconciler re-runs when they crash (emg.tended_runs)."""

    list_display = ["flow_run", "started_by", "reruns", "created_at", "ended_at", "outcome"]
    list_filter = [("ended_at", admin.EmptyFieldListFilter)]
    search_fields = ["started_by", "outcome"]
    readonly_fields = ["flow_run", "started_by", "reruns", "created_at", "ended_at", "outcome", "history_table"]
    exclude = ["flow_run_id", "history"]

    @admin.display(description="flow run")
    def flow_run(self, tended: TendedRun):
        return format_html('<a href="{}">{}</a>', flow_run_url(tended.flow_run_id), tended.flow_run_id)

    @admin.display(description="history")
    def history_table(self, tended: TendedRun):
        return history_html(tended.history)

    def has_add_permission(self, request):
        return False


@admin.register(ReconcileTick)
class ReconcileTickAdmin(admin.ModelAdmin):
    list_display = ["started_at", "finished_at", "worker", "report"]
    readonly_fields = list_display  # type: ignore[assignment]  # as above

    def has_add_permission(self, request):
        return False
