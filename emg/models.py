from datetime import datetime

from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.db.models.lookups import Exact

from emg.accessions import (
    MAX_ACCESSION_LENGTH,
    validate_run_accession,
    validate_sample_accession,
    validate_study_accession,
)
from emg.pipeline_options import RESERVED_KEYS, validate_pipeline_options  # noqa: F401 (0001 names it here)
from slurm_adapter import JobState

# The functional form (the members come from JobState), which django-stubs does not describe.
ClusterJobState = models.TextChoices(  # type: ignore[call-overload]
    "ClusterJobState",
    # Declared: known to us, not yet given to the cluster; then every state the adapter reports;
    # Rejected: sbatch refused the job for good (its message is the job's submit_error).
    [("DECLARED", ("DECLARED", "Declared"))]
    + [(state.name, (state.value, state.value.replace("_", " ").capitalize())) for state in JobState]
    + [("REJECTED", ("REJECTED", "Rejected by Slurm"))],
)
FINAL_JOB_STATES = [state.value for state in JobState if state.is_final] + [ClusterJobState.REJECTED]


def job_tag(fingerprint: str, job_id: int, attempt: int) -> str:
    """Names one attempt in Slurm (in --comment and --job-name), so it can be found again even if
    we never learnt its id. Fingerprint first (what the work is), then the row and the attempt: an
    attempt superseded by the next never answers to the next one's tag."""
    return f"{fingerprint[:16]}-{job_id}-{attempt}"


ARRAY_TAG_PREFIX = "array-"


def array_tag(first_job_id: int, attempt: int) -> str:
    """Names one job array in Slurm (its tasks have one --comment and --job-name): by the first
    claim that went into it, which applied once, so no other array ever has this tag."""
    return f"{ARRAY_TAG_PREFIX}{first_job_id}-{attempt}"


class JsonType(models.Func):
    """The JSON type of a value ('object', 'array', ...): jsonb_typeof on PostgreSQL, json_type on SQLite."""

    function = "jsonb_typeof"
    output_field = models.CharField()

    def as_sqlite(self, compiler, connection, **extra_context):
        return self.as_sql(compiler, connection, function="json_type", **extra_context)


class Study(models.Model):
    accession = models.CharField(max_length=MAX_ACCESSION_LENGTH, unique=True, validators=[validate_study_accession])
    title = models.CharField(max_length=500, blank=True)
    # Flagged for processing: a study created with it runs raw-reads QC (flows.triggers, flows.read_qc).
    process_on_create = models.BooleanField(
        default=False, help_text="when the study is created, fetch its runs from ENA and QC their raw reads"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "studies"
        ordering = ["accession"]

    def __str__(self) -> str:
        return self.accession

    def save(self, *args, **kwargs):
        # Rows are created from flows, commands and the shell as well as forms: validate on every path.
        self.full_clean()
        super().save(*args, **kwargs)


class Sample(models.Model):
    accession = models.CharField(max_length=32, unique=True, validators=[validate_sample_accession])
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="samples")
    scientific_name = models.CharField(max_length=255, blank=True)
    tax_id = models.CharField(max_length=32, blank=True)

    class Meta:
        ordering = ["accession"]

    def __str__(self) -> str:
        return self.accession


class Run(models.Model):
    accession = models.CharField(max_length=32, unique=True, validators=[validate_run_accession])
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="runs")
    sample = models.ForeignKey(Sample, on_delete=models.CASCADE, related_name="runs")
    library_layout = models.CharField(max_length=16, blank=True)
    library_strategy = models.CharField(max_length=64, blank=True)
    instrument_model = models.CharField(max_length=128, blank=True)
    read_count = models.BigIntegerField(null=True, blank=True)
    fastq_ftp = models.JSONField(default=list, blank=True)
    fastq_md5 = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["accession"]

    def __str__(self) -> str:
        return self.accession


# Columns only the transition modules (emg.requests, emg.jobs) write: a save() never rewrites them.
TRANSITION_OWNED_REQUEST_FIELDS = frozenset(
    {
        "status",
        "status_reason",
        "current_step",
        "generation",
        "flow_run_id",
        "finished_at",
        "cancel_requested_at",
        "flow_reruns",
        "history",
        "ena_fetched_generation",
        "ena_fetched_at",
        "ena_runs",
        "deferred_until",
        "deferrals",
    }
)
TRANSITION_OWNED_JOB_FIELDS = frozenset(
    {
        "state",
        "raw_state",
        "attempts",
        "retries",
        "submission_started_at",
        "slurm_job_id",
        "submit_time",
        "log_path",
        "exit_code",
        "signal",
        "ended_at",
        "submit_error",
        "next_submit_at",
        "unreadable_state",
        "unreadable_since",
        "history",
        "spec",
        "output_manifest",
        "manifest_recorded_at",
        "cancel_requested_at",
        "usage",
        "array_tag",
        "array_index",
    }
)

# Columns only emg.waits writes: whether the wait is open, its rounds, and the history of both.
TRANSITION_OWNED_WAIT_FIELDS = frozenset({"released_at", "suspensions", "history"})


def editable_columns(instance: models.Model, owned: frozenset[str]) -> list[str]:
    return [field.name for field in instance._meta.concrete_fields if not field.primary_key and field.name not in owned]


class AnalysisRequestQuerySet(models.QuerySet):
    def unfinished(self):
        return self.exclude(status__in=AnalysisRequest.FINAL_STATUSES)


class AnalysisRequest(models.Model):
    class Status(models.TextChoices):
        PENDING = "PENDING", "Pending"
        RUNNING = "RUNNING", "Running"
        WAITING = "WAITING", "Waiting for the cluster"
        COMPLETED = "COMPLETED", "Completed"
        FAILED = "FAILED", "Failed"
        CANCELLED = "CANCELLED", "Cancelled"

    FINAL_STATUSES = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)

    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="analysis_requests")
    pipeline_options = models.JSONField(default=dict, blank=True, validators=[validate_pipeline_options])
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    status_reason = models.TextField(blank=True)
    current_step = models.CharField(max_length=64, blank=True)
    # A deliberate re-run bumps the generation, and each generation gets exactly one flow run.
    generation = models.PositiveIntegerField(default=1)
    flow_run_id = models.UUIDField(null=True, blank=True, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Set by an operator; the reconciler cancels the flow run and the jobs only this request needs.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # Times the reconciler re-ran this generation's flow run after it crashed, failed or went silent.
    flow_reruns = models.PositiveIntegerField(default=0)
    # Every change of status, appended by emg.requests in the statement that made it.
    history = models.JSONField(default=list, blank=True)
    # The generation whose ENA fetch succeeded and was stored (Study/Sample/Run rows, `ena_runs`): every
    # resume of that generation reads these instead of asking ENA again.
    ena_fetched_generation = models.PositiveIntegerField(null=True, blank=True)
    ena_fetched_at = models.DateTimeField(null=True, blank=True)
    ena_runs = models.JSONField(default=list, blank=True, help_text="Run accessions ENA listed for this generation.")
    # The flow asked to be run again later (ENA unavailable for its first fetch): the reconciler
    # schedules its run for then, and counts it here, not against the re-run budget.
    deferred_until = models.DateTimeField(null=True, blank=True)
    # A database default too: the column came after the others, and a writer that predates it
    # (a raw INSERT, a bulk loader) must still be able to add a row.
    deferrals = models.PositiveIntegerField(default=0, db_default=0)

    # Its outbox events (emg.triggers), for joins: OutboxEvent.objects.filter(request__status=...).
    events = GenericRelation("OutboxEvent", related_query_name="request")

    objects = AnalysisRequestQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        # The admin's actions each need their own permission: viewing (or editing) a request is not
        # the right to cancel a multi-day pipeline, or to run it again.
        permissions = [
            ("cancel_analysisrequest", "Can cancel analysis requests"),
            ("rerun_analysisrequest", "Can re-run ended analysis requests"),
        ]
        # Partial indexes for what every reconciler tick reads: they stay the size of the live work
        # however many requests have ended. (The statuses are FINAL_STATUSES: a class's Meta cannot
        # name its attributes; tests/test_models.py checks they agree.)
        indexes = [
            models.Index(
                fields=["created_at"],
                condition=~Q(status__in=["COMPLETED", "FAILED", "CANCELLED"]),
                name="request_unfinished",
            ),
            models.Index(
                fields=["cancel_requested_at"],
                condition=Q(cancel_requested_at__isnull=False),
                name="request_cancel_requested",
            ),
        ]
        constraints = [
            # Where the ORM's validation is bypassed (bulk_create, update, SQL): options stay a JSON
            # object, and never name what the orchestrator sets itself (the flow checks the rest).
            models.CheckConstraint(
                condition=Q(Exact(JsonType("pipeline_options"), "object")), name="pipeline_options_is_an_object"
            ),
            models.CheckConstraint(
                condition=~Q(pipeline_options__has_any_keys=list(RESERVED_KEYS)), name="pipeline_options_not_reserved"
            ),
        ]

    def __str__(self) -> str:
        return f"Analysis of {self.study_id and self.study.accession} (#{self.pk})"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL_STATUSES

    def request_cancel(self) -> bool:
        """Ask the reconciler to cancel this request; False if it has already ended."""
        from emg import requests

        return requests.request_cancel(self)

    def rerun(self) -> None:
        """Start a new generation of an ended request: a new event, so a new flow run."""
        from emg import requests

        requests.rerun(self)

    def clean(self):
        # A blank field skips its validators, and null is "blank" to Django: check it here, so a
        # `null` in the admin form is a form error rather than a NOT NULL violation.
        if self.pipeline_options is None:
            raise ValidationError(
                {
                    "pipeline_options": ValidationError(
                        "Pipeline options must be a JSON object of option name to value ({} for none), not null.",
                        code="invalid_options",
                    )
                }
            )

    def save(self, *args, **kwargs):
        self.full_clean()
        if self.pk is not None and not self._state.adding and "update_fields" not in kwargs:
            # An edit (an admin form, a shell) saves what it may change; the status and its kin
            # change only through emg.requests, so an edit read before a transition never undoes it.
            kwargs["update_fields"] = editable_columns(self, TRANSITION_OWNED_REQUEST_FIELDS)
        # The post_save receiver writes the run event; one transaction holds both rows.
        with transaction.atomic():
            super().save(*args, **kwargs)


class OutboxEventQuerySet(models.QuerySet):
    def of(self, *rows: models.Model) -> "OutboxEventQuerySet":
        """The events of these rows (of one model), of whichever trigger."""
        if not rows:
            return self.none()
        content_type = ContentType.objects.get_for_model(type(rows[0]))
        return self.filter(content_type=content_type, object_id__in=[row.pk for row in rows])


class OutboxEvent(models.Model):
    """An event written in the same transaction as the change it announces (emg.triggers).

    It is published to Redis after commit; if that fails, or the consumer dies, the sweep
    publishes it again. `dispatched_at` is set once, by the consumer that started the flow run
    (or found the event superseded), with the run in `flow_run_id`.
    """

    id = models.UUIDField(primary_key=True)
    # The name of the trigger (emg.triggers) that wrote it, and the row whose change it announces.
    trigger = models.CharField(max_length=100)
    content_type = models.ForeignKey(ContentType, on_delete=models.PROTECT, related_name="+")
    object_id = models.PositiveBigIntegerField()
    changed = GenericForeignKey("content_type", "object_id")
    # Names the one flow run this event makes (with the trigger, its Prefect idempotency key).
    run_key = models.CharField(max_length=200)
    # The run's parameters, as they were when the change was made.
    parameters = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    published_at = models.DateTimeField(null=True, blank=True)
    publish_attempts = models.PositiveIntegerField(default=0)
    dispatched_at = models.DateTimeField(null=True, blank=True, db_index=True)
    flow_run_id = models.UUIDField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    objects = OutboxEventQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["trigger", "run_key"], name="one_event_per_run_key"),
        ]
        indexes = [
            # The outbox sweep reads the undispatched events at every beat.
            models.Index(fields=["created_at"], condition=Q(dispatched_at__isnull=True), name="outbox_undispatched"),
            # A row's events (the admin, GenericRelation joins).
            models.Index(fields=["content_type", "object_id"], name="outbox_event_object"),
        ]

    def __str__(self) -> str:
        return f"{self.trigger} {self.run_key}"


class ClusterJobQuerySet(models.QuerySet):
    def live(self):
        return self.exclude(state__in=FINAL_JOB_STATES)

    def wanted(self):
        """Live jobs not given up: the ones a flow may still wait for (see emg.jobs.give_up)."""
        return self.live().filter(cancel_requested_at__isnull=True)

    def declared(self):
        return self.filter(state=ClusterJobState.DECLARED)

    def awaited(self):
        """Submitted jobs whose outcome Slurm has not yet told us."""
        return self.live().exclude(state=ClusterJobState.DECLARED)

    def declare(
        self,
        *,
        name: str,
        fingerprint: str,
        spec: dict,
        input_hashes: dict,
        policy: dict,
        output_dir: str = "",
        outputs: list | tuple = (),
    ) -> "ClusterJob":
        """A new declared job, or the live one with this fingerprint.

        Race-free across processes: the partial unique index on live fingerprints lets
        exactly one concurrent insert win; the others read the winner's row.
        """
        try:
            with transaction.atomic():
                return self.create(  # type: ignore[return-value]
                    name=name,
                    fingerprint=fingerprint,
                    spec=spec,
                    input_hashes=input_hashes,
                    policy=policy,
                    output_dir=output_dir,
                    outputs=list(outputs),
                )
        except IntegrityError:
            return self.wanted().get(fingerprint=fingerprint)


class ClusterJob(models.Model):
    name = models.CharField(max_length=200)
    fingerprint = models.CharField(max_length=64, db_index=True)
    spec = models.JSONField()
    input_hashes = models.JSONField(default=dict, blank=True)
    policy = models.JSONField(default=dict, blank=True, help_text="The ResubmitPolicy this job was declared with.")
    state = models.CharField(max_length=16, choices=ClusterJobState.choices, default=ClusterJobState.DECLARED)
    raw_state = models.CharField(max_length=64, blank=True)
    slurm_job_id = models.CharField(max_length=32, blank=True, db_index=True)
    submit_time = models.DateTimeField(null=True, blank=True)
    # Set just before sbatch runs: if we crash before recording the job id, the next
    # submitter looks the attempt's tag up in Slurm instead of submitting a twin.
    submission_started_at = models.DateTimeField(null=True, blank=True)
    log_path = models.CharField(max_length=1024, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    signal = models.IntegerField(null=True, blank=True)
    # The job array the current attempt was claimed into (its tag, in --comment and --job-name, and
    # this job's index in it: Slurm's "<array id>_<index>"), or "" / None when submitted on its own.
    array_tag = models.CharField(max_length=64, blank=True)
    array_index = models.PositiveIntegerField(null=True, blank=True)
    # Submissions to Slurm; each has its own tag. A claim whose answer was lost and whose tag
    # Slurm does not know is superseded by the next attempt, never submitted twice.
    attempts = models.PositiveIntegerField(default=0)
    # Times the job was declared again after it ran out of memory or time or lost its node.
    retries = models.PositiveIntegerField(default=0)
    # Slurm's last refusal of sbatch: why the job was REJECTED, or the transient error it waits out.
    submit_error = models.TextField(blank=True)
    # After a transient sbatch error, the claim is looked up by tag and retried from then on.
    next_submit_at = models.DateTimeField(null=True, blank=True)
    # A state Slurm printed that we cannot read: alerted and polled on, never a reason to cancel.
    unreadable_state = models.CharField(max_length=64, blank=True)
    unreadable_since = models.DateTimeField(null=True, blank=True)
    history = models.JSONField(default=list, blank=True)
    # The pipeline's Nextflow trace (tasks, exit status, duration, peak memory), for provenance.
    trace = models.JSONField(null=True, blank=True)
    # Content-addressed outputs: the job writes only under its own directory, named by its fingerprint
    # (EMG_WORK_DIR/jobs/<fingerprint>/, results in its `results/`), and declares what it produces there.
    output_dir = models.CharField(max_length=1024, blank=True)
    outputs = models.JSONField(default=list, blank=True, help_text="Declared outputs, relative to output_dir.")
    # sha256 of each declared output, recorded once by the first flow that sees the job COMPLETED;
    # the job is reused only while its outputs still hash to this.
    output_manifest = models.JSONField(null=True, blank=True)
    manifest_recorded_at = models.DateTimeField(null=True, blank=True)
    # When a Slurm answer last wrote the state. A tick that finds the state unchanged writes nothing
    # (a row rewritten every tick is a row version per job per tick); it records instead, once, that
    # it read every awaited job: ReconcileTick.job_states_read_at.
    state_checked_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When Slurm's answer last changed this row; unchanged jobs are read at "
        "every tick (see the ticks' 'job states read at').",
    )
    # Given up: no live request waits for it (emg.jobs.give_up). The reconciler stops it; no flow
    # attaches to it any more, and an identical job declared meanwhile is submitted once it has ended.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # What the ended job used and asked for (slurm_adapter.JobUsage: CPU seconds, CPUs, wall time,
    # peak and requested memory, time limit), read from sacct once by the reconciler.
    usage = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ClusterJobQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        permissions = [("resubmit_clusterjob", "Can resubmit ended cluster jobs")]
        constraints = [
            # Two flows declaring the same work at once get one live row: the loser of the
            # insert race reads the winner's row instead of submitting a twin. A row given up
            # (being cancelled) does not count: its successor waits to be submitted until it ends.
            models.UniqueConstraint(
                fields=["fingerprint"],
                condition=~Q(state__in=FINAL_JOB_STATES) & Q(cancel_requested_at__isnull=True),
                name="one_wanted_job_per_fingerprint",
            ),
        ]
        # Every tick reads the live jobs (awaited, declared, given up) and the claims of the last
        # minute; the usage step reads the recently ended jobs it has no usage for.
        indexes = [
            models.Index(fields=["state"], condition=~Q(state__in=FINAL_JOB_STATES), name="cluster_job_live"),
            models.Index(
                fields=["cancel_requested_at"],
                condition=Q(cancel_requested_at__isnull=False) & ~Q(state__in=FINAL_JOB_STATES),
                name="cluster_job_given_up_live",
            ),
            models.Index(fields=["submission_started_at"], name="cluster_job_claimed_at"),
            models.Index(
                fields=["ended_at"],
                condition=Q(usage__isnull=True) & Q(ended_at__isnull=False),
                name="cluster_job_usage_unread",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.slurm_job_id or 'not submitted'}, {self.state})"

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding and "update_fields" not in kwargs:
            # The state and its kin change only through emg.jobs (compare-and-set); a save never rewrites them.
            kwargs["update_fields"] = editable_columns(self, TRANSITION_OWNED_JOB_FIELDS)
        super().save(*args, **kwargs)

    @property
    def tag(self) -> str:
        """This attempt's name in Slurm (see job_tag)."""
        return job_tag(self.fingerprint, self.id, self.attempts)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_JOB_STATES

    def resubmit(self) -> "ClusterJob":
        """Declare this ended job again as a new row (history stays); the live twin if one exists."""
        if not self.is_final:
            raise ValidationError(f"cluster job #{self.id} is still {self.state}")
        return ClusterJob.objects.declare(
            name=self.name,
            fingerprint=self.fingerprint,
            spec=self.spec,
            input_hashes=self.input_hashes,
            policy=self.policy,
            output_dir=self.output_dir,
            outputs=self.outputs,
        )

    @property
    def outcome(self) -> str:
        if self.state == ClusterJobState.REJECTED:
            return f"Slurm refused the job: {self.submit_error}"
        if self.state == ClusterJobState.CANCELLED and not self.slurm_job_id:
            return "cancelled before it was submitted"
        if self.state == JobState.COMPLETED:
            return f"Slurm job {self.slurm_job_id} completed"
        detail = f"exit code {self.exit_code}" if self.exit_code is not None else "no exit code"
        if self.signal:
            detail += f", signal {self.signal}"
        return f"Slurm job {self.slurm_job_id} ended {self.raw_state or self.state} ({detail})"


class JobWait(models.Model):
    """A flow run waiting, at one named step, for one cluster job.

    The flow re-runs from the top on every resume; this row is how it finds the job it
    already declared at that step instead of declaring it again.
    """

    flow_run_id = models.UUIDField()
    step = models.CharField(max_length=64)
    job = models.ForeignKey(ClusterJob, on_delete=models.PROTECT, related_name="waits")
    request = models.ForeignKey(AnalysisRequest, on_delete=models.CASCADE, null=True, blank=True, related_name="waits")
    suspensions = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    released_at = models.DateTimeField(null=True, blank=True)
    # Every opening, release and re-opening, appended by emg.waits in the statement that made it. A
    # database default too: the column came after the others, and a writer that predates it (a raw
    # INSERT, a process of the previous release during a deploy) must still be able to add a row.
    history = models.JSONField(default=list, db_default=[], blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [models.UniqueConstraint(fields=["flow_run_id", "step"], name="one_job_per_flow_step")]
        # Every tick reads the open waits; released ones are history (and pruned, workers.reconcile.prune).
        indexes = [
            models.Index(fields=["created_at"], condition=Q(released_at__isnull=True), name="job_wait_open"),
            models.Index(fields=["released_at"], condition=Q(released_at__isnull=False), name="job_wait_released"),
        ]

    def __str__(self) -> str:
        return f"{self.flow_run_id} waits at {self.step} for job #{self.job_id}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding and "update_fields" not in kwargs:
            # Opening and releasing happen only through emg.waits (compare-and-set); a save never rewrites them.
            kwargs["update_fields"] = editable_columns(self, TRANSITION_OWNED_WAIT_FIELDS)
        super().save(*args, **kwargs)


# Columns only emg.children writes: where the child run stands, and the parent's wait on it.
TRANSITION_OWNED_CHILD_FIELDS = frozenset(
    {
        "state",
        "child_flow_run_id",
        "claimed_at",
        "outcome",
        "cancel_requested_at",
        "ended_at",
        "suspensions",
        "released_at",
        "history",
    }
)


class ChildRunState(models.TextChoices):
    # The row is written; no Prefect run yet.
    DECLARED = "DECLARED", "Declared"
    # A process of the parent has claimed its creation (the Prefect run may or may not exist yet).
    CREATING = "CREATING", "Creating"
    # Its Prefect run exists (child_flow_run_id) and has not ended.
    RUNNING = "RUNNING", "Running"
    # Ended, as Prefect's final state type says.
    COMPLETED = "COMPLETED", "Completed"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"
    CRASHED = "CRASHED", "Crashed"


FINAL_CHILD_STATES = [
    ChildRunState.COMPLETED,
    ChildRunState.FAILED,
    ChildRunState.CANCELLED,
    ChildRunState.CRASHED,
]


class ChildRunQuerySet(models.QuerySet):
    def live(self):
        return self.exclude(state__in=FINAL_CHILD_STATES)


class ChildRun(models.Model):
    """A parent flow run's child: a run of another deployment, started by flows.child_flows
    (one per parent run and key), that the parent waits for suspended, holding no process.

    Its state moves only through emg.children (compare-and-set). `suspensions` and `released_at`
    are the parent's wait on it, as JobWait's are on a job: open while the parent may still be
    waiting, with a round per suspension.
    """

    parent_flow_run_id = models.UUIDField()
    key = models.CharField(max_length=200)
    deployment = models.CharField(max_length=200)
    parameters = models.JSONField(default=dict, blank=True)
    # Prefect's idempotency key of the child run: one run per (instance, parent run, key), however
    # many processes of the parent create it.
    idempotency_key = models.CharField(max_length=400, unique=True)
    # The request the parent runs for, if any: cancelling it cancels the children.
    request = models.ForeignKey(
        AnalysisRequest, on_delete=models.CASCADE, null=True, blank=True, related_name="child_runs"
    )
    state = models.CharField(max_length=16, choices=ChildRunState.choices, default=ChildRunState.DECLARED)
    child_flow_run_id = models.UUIDField(null=True, blank=True, unique=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    # The final Prefect state's name and message.
    outcome = models.TextField(blank=True)
    # Given up (its parent was cancelled, or its request ended): the reconciler cancels its run.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    suspensions = models.PositiveIntegerField(default=0)
    released_at = models.DateTimeField(null=True, blank=True)
    history = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ChildRunQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [models.UniqueConstraint(fields=["parent_flow_run_id", "key"], name="one_child_per_parent_key")]
        # Every tick reads the live children and the open waits on them.
        indexes = [
            models.Index(
                fields=["state"],
                condition=~Q(state__in=["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]),
                name="child_run_live",
            ),
            models.Index(fields=["created_at"], condition=Q(released_at__isnull=True), name="child_run_open"),
        ]

    def __str__(self) -> str:
        return f"child {self.key} of {self.parent_flow_run_id} ({self.state})"

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_CHILD_STATES

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding and "update_fields" not in kwargs:
            # Its state and the wait on it change only through emg.children; a save never rewrites them.
            kwargs["update_fields"] = editable_columns(self, TRANSITION_OWNED_CHILD_FIELDS)
        super().save(*args, **kwargs)


# Columns only emg.tended_runs writes: a tended run's re-runs and its end.
TRANSITION_OWNED_TENDED_FIELDS = frozenset({"reruns", "ended_at", "outcome", "history"})


class TendedRunQuerySet(models.QuerySet):
    def live(self):
        return self.filter(ended_at__isnull=True)


class TendedRun(models.Model):
    """A flow run the reconciler looks after until it ends: re-run in place when it crashes or falls
    silent (a runner killed, a process frozen), at most EMG_MAX_FLOW_RERUNS times.

    Made for every run a trigger starts (workers.dispatch) and every child run (flows.child_flows),
    whatever its flow: a run with no AnalysisRequest (the QC, a parent flow, a child) has the
    recovery a request's run has. A request's own run is tended by its request (emg.requests,
    workers.reconcile.flow_runs), and its row here stays open until the request ends. Its re-runs
    and its end move only through emg.tended_runs (compare-and-set).
    """

    flow_run_id = models.UUIDField(unique=True)
    # What started it, for people: "trigger study-created-qc (run key 7)", "child qc of <run>".
    started_by = models.CharField(max_length=300)
    reruns = models.PositiveIntegerField(default=0)
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.TextField(blank=True)
    history = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TendedRunQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        # Every tick reads the live ones.
        indexes = [models.Index(fields=["created_at"], condition=Q(ended_at__isnull=True), name="tended_run_live")]

    def __str__(self) -> str:
        return f"flow run {self.flow_run_id} ({self.started_by})"

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding and "update_fields" not in kwargs:
            kwargs["update_fields"] = editable_columns(self, TRANSITION_OWNED_TENDED_FIELDS)
        super().save(*args, **kwargs)


class ReconcileTick(models.Model):
    """One reconciler tick: when it ran, where, and what it did (for operators, and to prove ticks never overlap)."""

    KEEP = 2000

    started_at = models.DateTimeField(db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    report = models.JSONField(default=dict, blank=True)
    # When this tick read the state of every awaited job (null: it could not). The "last checked"
    # of a job whose state did not change is the latest of these.
    job_states_read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"tick at {self.started_at:%Y-%m-%d %H:%M:%S}"

    @classmethod
    def job_states_last_read_at(cls) -> datetime | None:
        """When a tick last read the state of every awaited job."""
        return (
            cls.objects.filter(job_states_read_at__isnull=False)
            .order_by("-started_at")
            .values_list("job_states_read_at", flat=True)
            .first()
        )


def last_checked(job: "ClusterJob", job_states_read_at: datetime | None) -> datetime | None:
    """When the job's state was last read from Slurm: the tick's read, for an awaited job it did not change."""
    if job.state in FINAL_JOB_STATES or job.state == ClusterJobState.DECLARED or job_states_read_at is None:
        return job.state_checked_at
    return max(job.state_checked_at, job_states_read_at) if job.state_checked_at else job_states_read_at


class Assembly(models.Model):
    """What a request's assembly job produced."""

    request = models.OneToOneField(AnalysisRequest, on_delete=models.CASCADE, related_name="assembly")
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="assemblies")
    job = models.ForeignKey(ClusterJob, on_delete=models.PROTECT, related_name="assemblies")
    contigs = models.PositiveIntegerField()
    total_length = models.PositiveBigIntegerField()
    n50 = models.PositiveIntegerField()
    stats = models.JSONField(default=dict)
    results_path = models.CharField(max_length=1024)
    analysis_skipped_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "assemblies"

    def __str__(self) -> str:
        return f"assembly of {self.study} ({self.contigs} contigs, {self.total_length} bp)"


class Analysis(models.Model):
    """What a request's analysis job found in its assembly."""

    request = models.OneToOneField(AnalysisRequest, on_delete=models.CASCADE, related_name="analysis")
    assembly = models.ForeignKey(Assembly, on_delete=models.CASCADE, related_name="analyses")
    job = models.ForeignKey(ClusterJob, on_delete=models.PROTECT, related_name="analyses")
    summary = models.JSONField(default=dict)
    results_path = models.CharField(max_length=1024)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "analyses"

    def __str__(self) -> str:
        return f"analysis of {self.assembly}"


class FlowRunLease(models.Model):
    """A runner's word that a flow run has a live process: renewed every few seconds by the runner
    that started it (flows/serve.py) for as long as that process exists, frozen or not.

    A run Running with no heartbeat is a zombie only if its lease is stale too (emg.leases).
    """

    flow_run_id = models.UUIDField(primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    renewed_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.flow_run_id} runs as pid {self.pid} on {self.host}"


class StudyQC(models.Model):
    """One raw-reads QC run of a study (flows.read_qc): the runs it covers, fixed at its first fetch
    from ENA (so every resume QCs the same runs), and once all are done, the study's summary."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="qc_runs")
    flow_run_id = models.UUIDField()
    run_accessions = models.JSONField(default=list)
    fetched_at = models.DateTimeField(auto_now_add=True)
    runs_passed = models.PositiveIntegerField(null=True, blank=True)
    total_reads = models.PositiveBigIntegerField(null=True, blank=True)
    total_bases = models.PositiveBigIntegerField(null=True, blank=True)
    summary = models.JSONField(default=dict, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "study QC"
        verbose_name_plural = "study QC"
        constraints = [models.UniqueConstraint(fields=["study", "flow_run_id"], name="one_qc_per_study_flow_run")]

    def __str__(self) -> str:
        done = f"{self.runs_passed}/{len(self.run_accessions)} runs passed" if self.finished_at else "in progress"
        return f"QC of {self.study}: {done}"


class RunQC(models.Model):
    """What the QC job of one run measured, and whether the run passed the thresholds in force."""

    study_qc = models.ForeignKey(StudyQC, on_delete=models.CASCADE, related_name="runs")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="qc")
    job = models.ForeignKey(ClusterJob, on_delete=models.PROTECT, related_name="run_qc")
    reads = models.PositiveBigIntegerField()
    bases = models.PositiveBigIntegerField()
    mean_quality = models.FloatField()
    q30_percent = models.FloatField()
    gc_percent = models.FloatField()
    passed = models.BooleanField()
    failed_because = models.TextField(blank=True)
    summary = models.JSONField(default=dict)

    class Meta:
        verbose_name = "run QC"
        verbose_name_plural = "run QC"
        constraints = [models.UniqueConstraint(fields=["study_qc", "run"], name="one_qc_per_run_and_study_qc")]

    def __str__(self) -> str:
        return f"QC of {self.run}: {'passed' if self.passed else 'failed'}"


class StudyReport(models.Model):
    """A study processed end to end (flows.process_study): created to ask for it, filled in by the
    flow, which runs the study's raw-reads QC and its analysis request as child flows."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="reports")
    requested_at = models.DateTimeField(auto_now_add=True)
    # Written by emg.study_reports only, each once: the flow run, the request its first pass made,
    # the QC its child made, and the report itself when both children have ended.
    flow_run_id = models.UUIDField(null=True, blank=True)
    request = models.OneToOneField(
        AnalysisRequest, on_delete=models.SET_NULL, null=True, blank=True, related_name="study_report"
    )
    qc = models.ForeignKey(StudyQC, on_delete=models.SET_NULL, null=True, blank=True, related_name="reports")
    finished_at = models.DateTimeField(null=True, blank=True)
    summary = models.JSONField(default=dict, blank=True)

    def __str__(self) -> str:
        return f"report on {self.study} ({'finished' if self.finished_at else 'in progress'})"
