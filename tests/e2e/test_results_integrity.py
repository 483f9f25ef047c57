"""Results belong to their request: each job writes only in its own content-addressed directory,
reuse is checked against the outputs' recorded checksums, the data move carries only declared
outputs, and ENA is asked once per generation. All on the live stack and the real Slurm cluster.
"""

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from devstack.processes import ROOT, wait_until
from emg.models import Analysis, AnalysisRequest, Assembly, ClusterJob, JobWait
from tests.e2e.requests import assert_each_job_ran_once_in_slurm, final_request, jobs_of, new_request
from tests.slurm import cluster_blocked

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

STUDIES = ("PRJEB40001", "PRJEB40002", "PRJEB40500")
OPTION_SETS = ({}, {"k": 31})
# 30 as in production bursts; on a loaded 2-CPU machine 30 take over ten minutes (flow resumes are
# process starts), so CI may ask for fewer. One deadline for the whole burst.
CONCURRENT_REQUESTS = int(os.environ.get("EMG_TEST_CONCURRENT_REQUESTS", "30"))
BURST_DEADLINE_SECONDS = max(600, 45 * CONCURRENT_REQUESTS)
MOVED = {"assembly/assembly_stats.json", "assembly/contigs.fasta"}
ANALYSED = {"analysis/analysis_summary.json", "analysis/predicted_orfs.faa"}


def results_dir(request: AnalysisRequest) -> Path:
    assert request.status_reason.startswith("results in "), request.status_reason
    return Path(request.status_reason.removeprefix("results in "))


def moved_files(request: AnalysisRequest) -> set[str]:
    root = results_dir(request)
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def assembled_alone(samplesheet: str, options: dict, outdir: Path) -> dict:
    """The assembly pipeline run by itself, outside the stack, on the same samplesheet and options."""
    arguments = [f"--{name}={value}" for name, value in options.items()]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "assembly.py"),
            "--samplesheet",
            samplesheet,
            "--outdir",
            str(outdir),
            *arguments,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return json.loads((outdir / "assembly_stats.json").read_text())


def samplesheet_of(job: ClusterJob) -> str:
    command = job.spec["command"]
    return command[command.index("--samplesheet") + 1]


def assert_no_output_dir_shared_between_fingerprints() -> None:
    fingerprints_by_dir = defaultdict(set)
    for job in ClusterJob.objects.all():
        fingerprints_by_dir[job.output_dir].add(job.fingerprint)
        fingerprints_by_dir[job.spec["work_dir"]].add(job.fingerprint)
    shared = {directory: prints for directory, prints in fingerprints_by_dir.items() if len(prints) > 1}
    assert not shared, shared


def test_concurrent_requests_for_three_studies_with_two_option_sets_each_get_the_results_of_a_lone_run(stack, tmp_path):
    started = time.monotonic()
    requests = [
        new_request(STUDIES[n % len(STUDIES)], pipeline_options=OPTION_SETS[(n // len(STUDIES)) % 2])
        for n in range(CONCURRENT_REQUESTS)
    ]
    for request in requests:
        final_request(request, stack, timeout=max(1, BURST_DEADLINE_SECONDS - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    print(f"{CONCURRENT_REQUESTS} concurrent requests completed in {elapsed:.0f} s")

    assert [request.status for request in requests] == [AnalysisRequest.Status.COMPLETED] * len(requests), [
        (request.id, request.status_reason) for request in requests if request.status != "COMPLETED"
    ]
    alone = {}
    for request in requests:
        job = jobs_of(request)["assembly"]
        key = (request.study.accession, json.dumps(request.pipeline_options, sort_keys=True))
        if key not in alone:
            alone[key] = assembled_alone(samplesheet_of(job), request.pipeline_options, tmp_path / str(len(alone)))
        assert Assembly.objects.get(request=request).stats == alone[key], (request.id, key)
        moved_stats = json.loads((results_dir(request) / "assembly" / "assembly_stats.json").read_text())
        assert moved_stats == alone[key]
        expected = MOVED | (ANALYSED if Analysis.objects.filter(request=request).exists() else set())
        assert moved_files(request) == expected | {"MANIFEST.sha256"}, request.id
    # One assembly job per (study, options): identical work is shared, different work never is.
    assemblies = {jobs_of(request)["assembly"].id for request in requests}
    assert len(assemblies) == len(alone) == len(STUDIES) * len(OPTION_SETS)
    assert_no_output_dir_shared_between_fingerprints()


def test_a_request_with_the_options_of_an_earlier_one_gets_its_results_byte_for_byte_despite_another_between(stack):
    first = final_request(new_request("PRJEB40001", pipeline_options={"k": 21, "min_contig_length": 250}), stack)
    between = final_request(new_request("PRJEB40001", pipeline_options={"k": 31, "min_contig_length": 250}), stack)
    again = final_request(new_request("PRJEB40001", pipeline_options={"k": 21, "min_contig_length": 250}), stack)

    assert [r.status for r in (first, between, again)] == ["COMPLETED"] * 3, [
        r.status_reason for r in (first, between, again)
    ]
    a, b, c = (jobs_of(r)["assembly"] for r in (first, between, again))
    assert c.id == a.id and b.fingerprint != a.fingerprint and b.output_dir != a.output_dir
    for name in MOVED | ANALYSED:
        assert (results_dir(again) / name).read_bytes() == (results_dir(first) / name).read_bytes(), name
    assert (results_dir(between) / "assembly" / "contigs.fasta").read_bytes() != (
        results_dir(first) / "assembly" / "contigs.fasta"
    ).read_bytes()
    assert json.loads((results_dir(between) / "assembly" / "assembly_stats.json").read_text())["k"] == 31
    assert_no_output_dir_shared_between_fingerprints()


@pytest.mark.parametrize(("change", "min_contig_length"), [("deleted", 260), ("altered", 270)])
def test_an_output_changed_after_its_job_ended_makes_the_next_request_run_the_job_again(
    stack, change, min_contig_length
):
    options = {"min_contig_length": min_contig_length}
    first = final_request(new_request("PRJEB40001", pipeline_options=options), stack)
    assert first.status == AnalysisRequest.Status.COMPLETED, first.status_reason
    job = jobs_of(first)["assembly"]
    contigs = Path(job.output_dir) / "contigs.fasta"
    original = contigs.read_bytes()
    if change == "deleted":
        contigs.unlink()
    else:
        contigs.write_bytes(original.replace(b"A", b"C", 1))

    second = final_request(new_request("PRJEB40001", pipeline_options=options), stack)

    assert second.status == AnalysisRequest.Status.COMPLETED, second.status_reason
    rerun = jobs_of(second)["assembly"]
    assert rerun.id != job.id and rerun.fingerprint == job.fingerprint
    assert_each_job_ran_once_in_slurm([job, rerun])
    assert contigs.read_bytes() == original  # the job wrote it again
    assert (results_dir(second) / "assembly" / "contigs.fasta").read_bytes() == original
    assert rerun.output_manifest == job.output_manifest


def ena_cache_files() -> list[Path]:
    storage = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    return sorted(storage.glob(f"{django_settings.EMG_INSTANCE_NAMESPACE}-fetch-ena-*"))


def fetch_attempts_per_deferral(stack) -> int:
    """How many ENA searches one flow run makes before its fetch task gives up: 1 + its retries."""
    return 1 + int(stack.env.get("EMG_ENA_RETRIES", django_settings.EMG_ENA_RETRIES))


def test_a_first_fetch_that_outlasts_its_retries_defers_the_request_and_costs_no_rerun(stack, ena_server):
    """Two flow runs' worth of ENA outage on the very first fetch: the request waits, its run is
    scheduled again by the reconciler (no process held meanwhile), and it completes with its
    re-run budget untouched."""
    for path in ena_cache_files():
        path.unlink()
    outage = 2 * fetch_attempts_per_deferral(stack)
    ena_server.fail_next("PRJEB40001", [(503, outage)])
    request = new_request("PRJEB40001")

    def deferred_once():
        request.refresh_from_db()
        return request.deferrals >= 1 and request.status == "WAITING"

    wait_until(deferred_once, timeout=120, interval=0.5, message="the request was deferred after the outage")
    assert request.status_reason.startswith("waiting for ENA, unavailable: ENA answered HTTP 503")

    finished = final_request(request, stack, timeout=600)

    assert finished.status == "COMPLETED", finished.status_reason
    assert (finished.deferrals, finished.flow_reruns) == (2, 0)
    assert finished.ena_fetched_generation == 1
    deferrals = [entry["detail"] for entry in finished.history if entry["detail"].startswith("deferral ")]
    assert [detail.split(",")[0] for detail in deferrals] == ["deferral 1", "deferral 2"]


@pytest.mark.soak
def test_an_outage_longer_than_every_deferral_fails_the_request_saying_so(stack, ena_server):
    """Past EMG_ENA_MAX_DEFERRALS the outage ends the request FAILED with a reason naming ENA;
    nothing was submitted for it."""
    for path in ena_cache_files():
        path.unlink()
    max_deferrals = int(stack.env["EMG_ENA_MAX_DEFERRALS"])
    ena_server.fail_next("PRJEB40002", [(503, (max_deferrals + 1) * fetch_attempts_per_deferral(stack))])
    request = new_request("PRJEB40002", pipeline_options={"min_contig_length": 290})

    finished = final_request(request, stack, timeout=300)

    assert finished.status == "FAILED"
    assert f"ENA has been unavailable for {max_deferrals + 1} attempts" in finished.status_reason
    assert (finished.deferrals, finished.flow_reruns) == (max_deferrals, 0)
    assert not jobs_of(finished)
    ena_server.fail_next("PRJEB40002", [])


def test_ena_unavailable_and_rate_limiting_after_the_first_fetch_end_no_request(stack, ena_server):
    options = {"min_contig_length": 280}  # work no other test has done, so each request waits on the cluster
    with cluster_blocked():
        waiting = [
            new_request("PRJEB40001", pipeline_options=options),
            new_request("PRJEB40001", pipeline_options=options),
            new_request("PRJEB40002", pipeline_options=options),
        ]

        def fetched_and_waiting():
            rows = AnalysisRequest.objects.filter(id__in=[r.id for r in waiting])
            return all(r.ena_fetched_generation == 1 and r.status == "WAITING" for r in rows)

        wait_until(
            fetched_and_waiting,
            timeout=120,
            interval=0.5,
            message="every request stored its ENA fetch and waits for its assembly",
        )
        # The fetch tasks' cache expires (after a day in production): now only the stored fetch stands.
        for path in ena_cache_files():
            path.unlink()
        assert not ena_cache_files()
        before = {accession: ena_server.request_count(accession) for accession in ("PRJEB40001", "PRJEB40002")}
        for accession in before:
            ena_server.fail_next(accession, [(503, 2), (429, 2)])
        # A request whose first fetch meets the outage: retried with backoff, it gets through.
        latecomer = new_request("PRJEB40001", pipeline_options=options)
        wait_until(
            lambda: AnalysisRequest.objects.get(id=latecomer.id).ena_fetched_generation == 1,
            timeout=120,
            interval=0.5,
            message="the latecomer's first fetch got through the outage",
        )

    finished = [final_request(request, stack) for request in (*waiting, latecomer)]

    assert [r.status for r in finished] == ["COMPLETED"] * 4, [r.status_reason for r in finished]
    # The waiting requests resumed (more than once each) and never asked ENA: PRJEB40002's outage
    # is still queued, untouched; PRJEB40001's was met by the latecomer's first fetch alone.
    assert ena_server.request_count("PRJEB40002") == before["PRJEB40002"]
    assert ena_server.request_count("PRJEB40001") == before["PRJEB40001"] + 4 + 2
    ena_server.fail_next("PRJEB40002", [])  # the session's fake ENA: no later test may meet this outage
    assert all(JobWait.objects.filter(request=r).count() >= 2 for r in waiting)
