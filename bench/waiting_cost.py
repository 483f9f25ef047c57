"""Processes and memory of the whole stack while K pipelines wait on running Slurm jobs, vs the seed's way.

Ours: this run's own Prefect server, the Prefect runner (`flows.serve`), a Celery worker
(concurrency 2) and beat, on a fresh database, Redis and the real cluster. K analysis requests
(one recorded study, distinct values of a declared pipeline option, so K distinct assembly jobs, each a `sleep` that
runs for an hour) go through the real path: outbox, consumer, flow run, job declared, flow
suspended, job submitted by the reconciler. Measured once every flow run is suspended and every
job is in Slurm's queue, RUNNING or PENDING (other users' jobs may hold the node): the figure
`ours_jobs_running` says how many ran.

Baseline, in the same run, on the same Prefect server and jobs: a runner serving a flow that waits
in its own live process, polling its job with sacct every --poll-seconds (bench/seed_poll_flow.py),
one flow run per pipeline. Measured once all K runs are Running and have polled.

K grows in one run (1, then 10, then 50): pipelines already waiting stay. Each figure is the sum
over the named processes and all their descendants, from /proc: process count, RSS, and PSS
(shared pages split among the processes mapping them: the honest total).

    .venv/bin/python bench/waiting_cost.py [--sizes 1,10,50] [--poll-seconds 10] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from harness import BenchServices, configure_environment, emit, kill_pids, log, process_tree, tree_usage

SIZES = (1, 10, 50)
QUICK_SIZES = (1, 10)
STUDY = "PRJEB40001"
SAMPLES = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="numbers of waiting pipelines")
    parser.add_argument("--poll-seconds", type=float, default=10, help="the baseline's poll interval (default 10)")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} (for CI)")
    args = parser.parse_args()
    sizes = sorted(set(QUICK_SIZES if args.quick else map(int, args.sizes.split(","))))

    configure_environment(
        EMG_CLUSTER_BACKEND="slurm",
        # A job that runs for an hour, whatever arguments the flow gives it (bash -c ignores them).
        EMG_ASSEMBLY_COMMAND="bash -c 'sleep 3600' bench-assembly",
        EMG_PIPELINE_MEMORY_MB="20",
        EMG_RECONCILE_INTERVAL_SECONDS="2",
        EMG_MAX_ACTIVE_JOBS="1000",
        EMG_ENA_RETRY_DELAY_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    with BenchServices("waiting_cost") as services:
        services.slurm_cleanup()
        services.redis()
        server = services.prefect_server()
        services.django_database()
        services.ena_server()
        ours = start_our_stack(services)
        our_figures = [measure_ours(k, [server, *ours]) for k in sizes]
        baseline_figures = measure_baseline(services, sizes, server, args.poll_seconds)
    by_k = []
    for k, mine, theirs in zip(sizes, our_figures, baseline_figures, strict=True):
        by_k.append(
            {
                "k": k,
                **{f"ours_{key}": value for key, value in mine.items()},
                **{f"baseline_{key}": value for key, value in theirs.items()},
                "pss_ratio": round(theirs["pss_mb"] / mine["pss_mb"], 2),
                "rss_ratio": round(theirs["rss_mb"] / mine["rss_mb"], 2),
            }
        )
    first, last = by_k[0], by_k[-1]
    per_pipeline = {}
    if last["k"] > first["k"]:
        span = last["k"] - first["k"]
        for way in ("ours", "baseline"):
            per_pipeline[f"{way}_pss_mb_per_pipeline"] = round(
                (last[f"{way}_pss_mb"] - first[f"{way}_pss_mb"]) / span, 1
            )
            per_pipeline[f"{way}_processes_per_pipeline"] = round(
                (last[f"{way}_processes"] - first[f"{way}_processes"]) / span, 2
            )
    emit("waiting_cost", sizes=sizes, poll_seconds=args.poll_seconds, by_k=by_k, **per_pipeline)


def start_our_stack(services: BenchServices) -> list:
    """Runner, dispatch and tick workers and beat (devstack.Stack); their processes, for measuring."""
    return services.stack("bench-waiting-cost").processes


def usage_when_settled(roots: list[int]) -> dict:
    """The median of a few samples a second apart: one sample may catch a short-lived child."""
    samples = []
    for index in range(SAMPLES):
        if index:
            time.sleep(1)
        samples.append(tree_usage(roots))
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


def measure_ours(k: int, processes: list) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from devstack.processes import wait_until
    from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, JobWait, Study

    study, _ = Study.objects.get_or_create(accession=STUDY)
    existing = AnalysisRequest.objects.count()
    if existing == 0:
        # The first flow stores the study's records; the others then only update them.
        first = AnalysisRequest.objects.create(study=study, pipeline_options={"min_contig_length": 1})
        wait_until(
            lambda: AnalysisRequest.objects.get(id=first.id).status == AnalysisRequest.Status.WAITING,
            timeout=180,
            interval=0.5,
            message="the first pipeline waits",
        )
        existing = 1
    for index in range(existing, k):
        AnalysisRequest.objects.create(study=study, pipeline_options={"min_contig_length": 1 + index})

    def all_waiting() -> bool:
        requests = list(AnalysisRequest.objects.all())
        failed = [f"#{r.id}: {r.status_reason}" for r in requests if r.is_final]
        assert not failed, failed
        run_ids = [r.flow_run_id for r in requests if r.flow_run_id]
        if len(requests) != k or len(run_ids) != k:
            return False
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)), limit=k)
        jobs = ClusterJob.objects.filter(id__in=JobWait.objects.values("job_id"))
        # Running, or pending behind other people's jobs: either way in Slurm's queue, and awaited.
        queued = jobs.filter(state__in=[ClusterJobState.PENDING, ClusterJobState.RUNNING]).count()
        return all(run.state.name == "Suspended" for run in runs) and len(runs) == k and queued == k

    wait_until(all_waiting, timeout=120 + 10 * k, interval=1, message=f"{k} pipelines suspended on queued jobs")
    figures = usage_when_settled([process.process.pid for process in processes])
    figures["jobs_running"] = ClusterJob.objects.filter(state=ClusterJobState.RUNNING).count()
    log(f"ours, k={k}: {figures}")
    return figures


def measure_baseline(services: BenchServices, sizes: list[int], server, poll_seconds: float) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled
    from seed_poll_flow import DEPLOYMENT

    from devstack.processes import wait_until
    from emg.models import ClusterJob

    runner = services.process(
        "seed-runner", [sys.executable, "bench/seed_poll_flow.py", "--limit", str(max(sizes) + 5)]
    )
    jobs = list(ClusterJob.objects.exclude(slurm_job_id="").order_by("id"))
    figures = []
    run_ids = []
    tree: list[int] = []
    with get_client(sync_client=True) as client:
        deployment = wait_until(
            lambda: client.read_deployment_by_name(DEPLOYMENT),
            timeout=120,
            interval=0.5,
            message="the seed runner serves its deployment",
        )
        try:
            for k in sizes:
                for index in range(len(run_ids), k):
                    job = jobs[index % len(jobs)]
                    run_ids.append(
                        client.create_flow_run_from_deployment(
                            deployment.id,
                            parameters={
                                "job_id": job.slurm_job_id,
                                "submit_time": job.submit_time.isoformat(),
                                "poll_seconds": poll_seconds,
                            },
                        ).id
                    )

                def all_polling(k: int = k) -> bool:
                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                        flow_run_filter=FlowRunFilter(),
                        limit=k + 10,
                    )
                    broken = [run.state.name for run in runs if run.state.is_final()]
                    assert not broken, broken
                    return len(runs) == k and all(run.state.type == StateType.RUNNING for run in runs)

                wait_until(all_polling, timeout=120 + 10 * k, interval=1, message=f"{k} polling flow runs running")
                # Each has queried Slurm at least once before the samples are taken.
                time.sleep(min(poll_seconds, 5))
                tree = process_tree([runner.process.pid])
                usage = usage_when_settled([server.process.pid, runner.process.pid])
                log(f"baseline, k={k}: {usage}")
                figures.append(usage)
        finally:
            for run_id in run_ids:
                client.set_flow_run_state(run_id, Cancelled(message="benchmark over"), force=True)
            runner.stop()
            kill_pids(tree[1:])
    return figures


if __name__ == "__main__":
    main()
