"""Bad input: each gives a clear error, leaves the database consistent, and submits nothing
that should not be.

No stack: models are saved here, the flow runs in this process, and the reconciler ticks against a
Slurm client whose commands answer canned (broken) output.
"""

import json
import os
import subprocess
import threading
import uuid
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from devstack.processes import venv_script
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, OutboxEvent, Study
from emg.pipeline_options import option_arguments
from flows.analysis import command
from flows.ena import STUDY_FIELDS, EnaError, search
from slurm_adapter import JobSpec, SlurmCluster, safe_job_name
from slurm_adapter.spec import build_script
from slurm_adapter.status import SACCT_FIELDS
from tests.services import broker_unreachable
from tests.workers.ticking import held_tick_lock
from workers.reconciler import UNREADABLE, Reconciler

pytestmark = pytest.mark.django_db(transaction=True)

# --- accessions -----------------------------------------------------------------------------------

BAD_ACCESSIONS = [
    "",
    "PRJEB",
    "prjeb40001",
    " PRJEB40001",
    "PRJEB40001\n",
    "PRJEB40001\x00",
    "PRJEB" + "1" * 12,  # too long for an accession and for the column
    "PRJEB" + "1" * 5000,
    "PRJEB４０００１",  # full-width digits
    "ПРJEB40001",
    "PRJEB1'; DROP TABLE emg_study; --",
    'PRJEB1" OR study_accession="PRJEB40001',
    "PRJEB1$(touch /tmp/emg-pwned)",
    "PRJEB1`id`",
    "PRJEB1|id",
    "PRJEB1;rm -rf /",
    "../../etc/passwd",
]


@pytest.mark.parametrize("accession", BAD_ACCESSIONS)
def test_a_bad_accession_is_refused_with_a_clear_error_and_nothing_is_saved_or_published(accession):
    with pytest.raises(ValidationError) as refused:
        Study(accession=accession).save()

    [problem, *_] = refused.value.error_dict["accession"]
    codes = {error.code for error in refused.value.error_dict["accession"]}
    assert "invalid_accession" in codes or codes == {"blank"}, problem
    assert "is not an ENA study accession" in str(refused.value) or accession == ""
    assert (Study.objects.count(), AnalysisRequest.objects.count(), OutboxEvent.objects.count()) == (0, 0, 0)


@pytest.mark.parametrize("accession", [a for a in BAD_ACCESSIONS if "\x00" not in a])
def test_a_bad_accession_that_reached_a_flow_is_never_sent_to_ena(accession, ena_server, settings):
    """Rows written around the model's validation (a raw update, a bulk load) still cannot steer the ENA query."""
    settings.EMG_ENA_PORTAL_API = ena_server.base_url
    before = ena_server.request_count()

    with pytest.raises(EnaError, match="is not an ENA study accession; ENA was not asked"):
        search("study", accession, STUDY_FIELDS)

    assert ena_server.request_count() == before


# --- model fields with newlines and '|' --------------------------------------------------------------


@pytest.mark.parametrize("name", ["note|x", "note\nx", "Note", "1note", "note x", "note;x", "n" * 41])
def test_a_pipeline_option_name_that_is_not_an_identifier_is_refused_before_anything_is_saved(name):
    study = Study.objects.create(accession="PRJEB40001")

    with pytest.raises(ValidationError, match="must be lowercase letters, digits and underscores"):
        AnalysisRequest.objects.create(study=study, pipeline_options={name: "1"})

    assert (AnalysisRequest.objects.count(), OutboxEvent.objects.count()) == (0, 0)


def test_option_values_with_newlines_pipes_quotes_and_substitutions_reach_the_job_as_they_are(tmp_path):
    marker = tmp_path / "pwned"
    options = {
        "note": "line one\nline two",
        "pipe": "a|b || c",
        "subst": f"$(touch {marker})",
        "backtick": f"`touch {marker}`",
        "quote": 'it\'s "quoted"',
        "glob": "*",
        "semicolon": f"x; touch {marker}",
    }
    # Declared string options may hold anything: values are never pasted into a shell.
    echo_argv = "python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    spec = JobSpec(
        name="emg-assembly-PRJEB40001", command=command(echo_argv, *option_arguments(options)), work_dir=str(tmp_path)
    )
    script = tmp_path / "job.sh"
    script.write_text(build_script(spec))

    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, check=True)

    expected = [part for name, value in options.items() for part in (f"--{name}", value)]
    assert json.loads(ran.stdout) == expected
    assert not marker.exists()


class CannedSlurm(SlurmCluster):
    """The real Slurm client, parsing what its commands "print": canned output instead of the cluster's."""

    def __init__(self, **answers: str):
        super().__init__(accounting_grace_s=60)
        self.answers = answers
        self.argvs: list[list[str]] = []

    def _run(self, argv, harmless_errors=()):
        self.argvs.append(list(argv))
        if argv[0] == "sbatch":
            return "4242\n"
        if argv[0] == "sacct" and "-j" in argv:  # as sacct does: only the lines of the jobs asked for
            wanted = set(argv[argv.index("-j") + 1].split(","))
            lines = self.answers["sacct_by_id"].split("\n")
            return "\n".join(line for line in lines if line.split("|", 1)[0] in wanted)
        if argv[0] == "sacct":
            return self.answers["sacct_all"]
        if argv[0] == "squeue":
            return self.answers.get("squeue", "")
        return ""

    def ran(self, command: str) -> list[list[str]]:
        return [argv for argv in self.argvs if argv[0] == command]


def test_a_job_name_with_pipes_and_newlines_is_sanitised_for_slurm(tmp_path):
    cluster = CannedSlurm()
    spec = JobSpec(name="emg-assembly|rm -rf\nPRJEB40001\x1b[31m", command=("true",), work_dir=str(tmp_path))

    assert cluster.submit(spec, tag="abc-1-1").job_id == "4242"

    [argv] = cluster.ran("sbatch")
    [name] = [arg.removeprefix("--job-name=") for arg in argv if arg.startswith("--job-name=")]
    assert name == safe_job_name(f"abc-1-1 {spec.name}") == "abc-1-1 emg-assembly rm -rf PRJEB40001 [31m"


# --- Slurm answers we cannot fully read ----------------------------------------------------------------


@pytest.fixture
def only_our_ticks(transactional_db):
    """The beat's tick lock, held: a session stack, if one runs, skips its ticks while ours read canned output."""
    with held_tick_lock():
        yield


def reconciler(cluster: SlurmCluster, **limits) -> Reconciler:
    # No request and no flow run exists here, so the Prefect client is never called.
    return Reconciler(
        cluster,
        None,
        max_active_jobs=100,
        max_submissions_per_minute=100,
        resumes_per_tick=10,
        zombie_after=timedelta(hours=1),
        max_flow_reruns=3,
        **limits,
    )


def running_job(slurm_job_id: str, tmp_path, *, submitted_ago: timedelta = timedelta(minutes=10)) -> ClusterJob:
    now = timezone.now()
    return ClusterJob.objects.create(
        name=f"job-{slurm_job_id}",
        fingerprint=uuid.uuid4().hex * 2,
        spec=JobSpec(name=f"job-{slurm_job_id}", command=("true",), work_dir=str(tmp_path)).to_dict(),
        state=ClusterJobState.RUNNING,
        raw_state="RUNNING",
        slurm_job_id=slurm_job_id,
        attempts=1,
        submit_time=now - submitted_ago,
        submission_started_at=now - submitted_ago,
        history=[{"state": "RUNNING", "detail": "RUNNING", "at": now.isoformat()}],
    )


def sacct_line(job: ClusterJob, state: str, exit_code: str = "0:0") -> str:
    assert SACCT_FIELDS == ("JobID", "State", "ExitCode", "Submit", "Start", "End", "Comment")
    submit = job.submit_time.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{job.slurm_job_id}|{state}|{exit_code}|{submit}|{submit}|Unknown|emg:{job.tag}"


def test_an_unknown_slurm_state_is_recorded_and_polled_on_and_never_cancels_the_job(only_our_ticks, tmp_path):
    strange, normal = running_job("9001", tmp_path), running_job("9002", tmp_path)
    cluster = CannedSlurm(
        sacct_by_id="\n".join([sacct_line(strange, "EXPEDITING"), sacct_line(normal, "COMPLETED")]) + "\n"
    )
    ticks = reconciler(cluster)

    first = ticks.tick()
    assert first.changed == {"9002": "COMPLETED"}  # the other job is read as usual
    assert first.unreadable == {"9001": "EXPEDITING"}
    for _ in range(5):
        assert ticks.tick().unreadable == {"9001": "EXPEDITING"}
    strange.refresh_from_db()
    assert strange.state == ClusterJobState.RUNNING and not strange.is_final
    assert (strange.unreadable_state, strange.unreadable_since is not None) == ("EXPEDITING", True)
    # One entry when it became unreadable, not one per tick of a job that may run for days.
    assert [entry["state"] for entry in strange.history] == ["RUNNING", UNREADABLE]
    assert cluster.ran("scancel") == [] and cluster.ran("sbatch") == []

    cluster.answers["sacct_by_id"] = sacct_line(strange, "COMPLETED") + "\n"
    assert ticks.tick().changed == {"9001": "COMPLETED"}
    strange.refresh_from_db()
    assert (strange.state, strange.unreadable_state, strange.unreadable_since) == ("COMPLETED", "", None)


def test_a_truncated_sacct_answer_updates_the_jobs_it_holds_and_neither_regresses_nor_resubmits_the_rest(
    only_our_ticks, tmp_path
):
    done, also_done, cut = (running_job(n, tmp_path) for n in ("9011", "9012", "9013"))
    running_job("9014", tmp_path, submitted_ago=timedelta(seconds=5))
    full = [sacct_line(done, "COMPLETED"), sacct_line(also_done, "FAILED", "3:0"), sacct_line(cut, "COMPLETED")]
    # The answer stops in the middle of the third line; the fourth job's line never came.
    truncated = "\n".join(full)[: -len(sacct_line(cut, "COMPLETED")) + 7]
    cluster = CannedSlurm(sacct_by_id=truncated, sacct_all="\n".join(full) + "\n", squeue="")

    report = reconciler(cluster).tick()

    jobs = {job.slurm_job_id: job for job in ClusterJob.objects.all()}
    assert {job_id: job.state for job_id, job in jobs.items()} == {
        "9011": "COMPLETED",
        "9012": "FAILED",
        "9013": "COMPLETED",  # missing from the answer and from squeue: found by its tag, not resubmitted
        "9014": "RUNNING",  # missing, but reported running before: left as it was, not SUBMITTED again
    }
    assert jobs["9012"].exit_code == 3
    assert any("9013" in error and "found by its tag" in error for error in report.errors)
    assert cluster.ran("sbatch") == []
    assert ClusterJob.objects.count() == 4 and ClusterJob.objects.declared().count() == 0


def test_an_unreadable_queue_line_does_not_stop_submissions(only_our_ticks, tmp_path):
    declared = ClusterJob.objects.create(
        name="declared",
        fingerprint=uuid.uuid4().hex * 2,
        spec=JobSpec(name="declared", command=("true",), work_dir=str(tmp_path)).to_dict(),
    )
    cluster = CannedSlurm(squeue="EXPEDITING|emg:someone-else-1-1\n")

    report = reconciler(cluster).tick()

    assert report.submitted == ["4242"]
    assert any("cannot count the cluster's active jobs" in error for error in report.errors)
    declared.refresh_from_db()
    assert (declared.state, declared.slurm_job_id, declared.attempts) == ("SUBMITTED", "4242", 1)


# --- ENA answers that are not what they should be -------------------------------------------------------


@contextmanager
def http_server(status: int, content_type: str, body: bytes):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ena/portal/api"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("accession", "content_type", "body", "reason"),
    [  # studies no other test fetches, so no cached answer stands in for these
        ("PRJEB49001", "text/html", b"<html><body>Service temporarily unavailable</body></html>", "is not JSON"),
        ("PRJEB49002", "application/json", b'[{"study_accession": "PRJEB4', "is not JSON"),
        ("PRJEB49003", "application/json", b'{"message": "maintenance"}', "is not a list of records"),
    ],
)
def test_an_answer_from_ena_that_is_not_a_json_list_fails_the_request_clearly_and_submits_nothing(
    prefect_api_url, settings, accession, content_type, body, reason
):
    from flows.analysis import analyse_study

    with broker_unreachable(), transaction.atomic():
        request = AnalysisRequest.objects.create(study=Study.objects.create(accession=accession))
        OutboxEvent.objects.of(request).update(dispatched_at=timezone.now())

    with http_server(200, content_type, body) as url:
        settings.EMG_ENA_PORTAL_API = url
        assert analyse_study(request_id=request.id) == AnalysisRequest.Status.FAILED

    request.refresh_from_db()
    assert request.status == AnalysisRequest.Status.FAILED and request.finished_at is not None
    assert request.status_reason.startswith(f"ENA: ENA's answer for {accession} {reason}")
    assert request.current_step == "fetching from ENA"
    assert not ClusterJob.objects.exists()


@pytest.mark.parametrize("roles", ["dispatch,tick", "", " , "])
def test_a_celery_worker_given_unknown_roles_refuses_to_start_and_names_the_roles_it_knows(roles):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "emg.settings", "EMG_WORKER_ROLES": roles}
    result = subprocess.run(
        [venv_script("celery"), "-A", "workers", "worker", "-l", "INFO"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"EMG_WORKER_ROLES={roles!r}: expected a comma-separated list of ['dispatch', 'reconcile']" in result.stderr
