"""What the trigger costs a save(), and how fast a burst of saved requests gets its flow runs.

(a) save() time, --saves saves per way, interleaved in rounds of 20 after a warm-up: with no
    receiver at all (the floor), with ours (an outbox row in the save's transaction, published
    to Redis on commit), and with the seed system's (a synchronous `run_deployment` inside
    `post_save`). No Celery worker runs meanwhile, so nothing else competes for the CPU.
(b) --n requests saved in a burst, one transaction each, consumed by a Celery worker
    (concurrency 2, as the stack runs it): events/s from the first save until the last request
    has its flow run id, and save-to-flow-run latency per request (the event's created_at to its
    dispatched_at, which the consumer sets in the transaction that records the flow run id).

The analysis deployment exists on this run's own Prefect server but no runner serves it: flow
run creation is what is measured, and no flow runs.

    .venv/bin/python bench/event_latency.py [--saves 200] [--n 500] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from harness import BenchServices, configure_environment, emit, log, percentile

ROUND = 20
WARM_UP = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=200, help="saves per way in (a) (default 200)")
    parser.add_argument("--n", type=int, default=500, help="requests in the burst (b) (default 500)")
    parser.add_argument("--quick", action="store_true", help="--saves 40 --n 50 (for CI)")
    args = parser.parse_args()
    if args.quick:
        args.saves, args.n = 40, 50

    configure_environment(
        # No sweep runs here (no beat), and the grace must not matter: every event is published on commit.
        EMG_OUTBOX_GRACE_SECONDS="3600",
    )
    with BenchServices("event_latency") as services:
        services.redis()
        services.prefect_server()
        services.django_database()
        register_deployment()
        save_cost = measure_save_cost(args.saves)
        flush_broker()
        start_consumer(services)
        burst = measure_burst(args.n)
    emit("event_latency", **save_cost, **burst)


def register_deployment() -> None:
    from flows.analysis import analyse_study
    from flows.deployments import ANALYSIS_DEPLOYMENT_NAME

    analyse_study.to_deployment(name=ANALYSIS_DEPLOYMENT_NAME).apply()


def seed_receiver(sender, instance, created: bool = False, raw: bool = False, **kwargs) -> None:
    """The seed system's trigger: create the flow run right inside post_save, synchronously."""
    from prefect.deployments import run_deployment

    from flows.deployments import ANALYSIS_DEPLOYMENT

    if created and not raw:
        run_deployment(ANALYSIS_DEPLOYMENT, parameters={"request_id": instance.id, "generation": instance.generation},
                       timeout=0)


def measure_save_cost(saves: int) -> dict:
    from django.db.models.signals import post_save

    from emg.models import AnalysisRequest, Study
    from emg.signals import on_analysis_request_saved

    ours_uid = "emg.analysis_request_run_event"
    study = Study.objects.create(accession="PRJEB40001")

    def use(way: str) -> None:
        post_save.disconnect(sender=AnalysisRequest, dispatch_uid=ours_uid)
        post_save.disconnect(sender=AnalysisRequest, dispatch_uid="bench.seed")
        if way == "ours":
            post_save.connect(on_analysis_request_saved, sender=AnalysisRequest, dispatch_uid=ours_uid)
        elif way == "seed":
            post_save.connect(seed_receiver, sender=AnalysisRequest, dispatch_uid="bench.seed")

    def timed_saves(count: int) -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            AnalysisRequest.objects.create(study=study)
            times.append(time.perf_counter() - started)
        return times

    ways = ("none", "ours", "seed")
    times = {way: [] for way in ways}
    try:
        for way in ways:
            use(way)
            timed_saves(WARM_UP)
        for done in range(0, saves, ROUND):
            for way in ways:
                use(way)
                times[way] += timed_saves(min(ROUND, saves - done))
    finally:
        use("ours")
    ms = {way: [t * 1000 for t in values] for way, values in times.items()}
    median = {way: statistics.median(values) for way, values in ms.items()}
    figures = {
        "saves_per_way": saves,
        "save_ms_p50_no_trigger": round(median["none"], 2),
        "save_ms_p50_ours": round(median["ours"], 2),
        "save_ms_p50_seed": round(median["seed"], 2),
        "save_ms_p99_ours": round(percentile(ms["ours"], 99), 2),
        "save_ms_p99_seed": round(percentile(ms["seed"], 99), 2),
        "added_ms_ours": round(median["ours"] - median["none"], 2),
        "added_ms_seed": round(median["seed"] - median["none"], 2),
    }
    figures["added_ratio"] = round(figures["added_ms_seed"] / max(figures["added_ms_ours"], 0.01), 1)
    log(str(figures))
    return figures


def flush_broker() -> None:
    """The events of (a) were published with no consumer: they must not reach (b)'s consumer."""
    import redis
    from django.conf import settings
    from django.utils import timezone

    from emg.models import OutboxEvent

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    OutboxEvent.objects.update(dispatched_at=timezone.now())


def start_consumer(services: BenchServices) -> None:
    """One dispatch worker (what the burst measures); no tick worker, no beat."""
    from devstack.processes import wait_until
    from devstack.stack import celery_worker, worker_answers

    node = f"bench-event-latency-{os.getpid()}"
    worker = celery_worker("celery-worker", node, services.env(), services.log_dir, roles="dispatch").start()
    services.callback(worker.stop)
    wait_until(lambda: worker_answers(services.env(), node), timeout=60, message="the Celery worker answers pings")


def measure_burst(n: int) -> dict:
    from devstack.processes import wait_until
    from emg.models import AnalysisRequest, OutboxEvent, Study

    study = Study.objects.get(accession="PRJEB40001")
    # One request through first: the worker's first run_deployment pays for imports and connections.
    warm = AnalysisRequest.objects.create(study=study)
    wait_until(lambda: AnalysisRequest.objects.get(id=warm.id).flow_run_id, timeout=60, message="warm-up dispatched")

    started = time.perf_counter()
    requests = [AnalysisRequest.objects.create(study=study) for _ in range(n)]
    saving_s = time.perf_counter() - started
    ids = [request.id for request in requests]
    wait_until(lambda: not AnalysisRequest.objects.filter(id__in=ids, flow_run_id__isnull=True).exists(),
               timeout=max(120, n), interval=0.2, message=f"all {n} requests have a flow run")

    events = list(OutboxEvent.objects.filter(request_id__in=ids).values_list("created_at", "dispatched_at"))
    assert len(events) == n
    latencies = [(dispatched - created).total_seconds() for created, dispatched in events]
    span = (max(d for _, d in events) - min(c for c, _ in events)).total_seconds()
    figures = {
        "burst_n": n,
        "burst_saves_per_s": round(n / saving_s, 1),
        "events_per_s": round(n / span, 1),
        "latency_s_p50": round(percentile(latencies, 50), 3),
        "latency_s_p99": round(percentile(latencies, 99), 3),
        "latency_s_max": round(max(latencies), 3),
        "consumer_concurrency": 2,
    }
    log(str(figures))
    return figures


if __name__ == "__main__":
    main()
