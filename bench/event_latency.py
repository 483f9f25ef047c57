"""What the trigger costs a save(), and how fast a burst of saved requests gets its flow runs.

(a) save() time, --saves saves per way, interleaved in rounds of 20 after a warm-up: with no
    receiver at all (the floor), with ours (an outbox row in the save's transaction, published
    to Redis on commit), and with the seed system's (a synchronous `run_deployment` inside
    `post_save`). No Celery worker runs meanwhile, so nothing else competes for the CPU.
(b) The baseline of (c): Prefect's own create rate on this run's server, --n flow runs of the
    analysis deployment made through one long-lived client with the deployment id looked up once
    (`create_flow_run_from_deployment`, with the parameters, name, tags and idempotency key the
    consumer sends), from 1 thread and from 2 threads sharing the client.
(c) --n requests saved in a burst, one transaction each, consumed by one Celery dispatch worker
    (--pool/--concurrency, by default as the stack runs it): events/s from the first save until the
    last request has its flow run id, as a ratio of (b), and save-to-flow-run latency per request
    (the event's created_at to its dispatched_at, which the consumer sets in the transaction that
    records the flow run id).
(d) Below saturation: --paced saves at half the rate (c) reached, one at a time; their
    save-to-flow-run latency.

The analysis deployment exists on this run's own Prefect server but no runner serves it: flow
run creation is what is measured, and no flow runs.

    .venv/bin/python bench/event_latency.py [--saves 200] [--n 1000] [--paced 200] [--quick]
        [--pool prefork|threads] [--concurrency N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from harness import BenchServices, configure_environment, emit, log, percentile

ROUND = 20
WARM_UP = 5
# What devstack.stack runs the dispatch worker with (see bench/README.md for the alternatives measured).
DISPATCH_POOL = "prefork"
DISPATCH_CONCURRENCY = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=200, help="saves per way in (a) (default 200)")
    parser.add_argument(
        "--n", type=int, default=1000, help="flow runs per way in (b), requests in the burst (c) (default 1000)"
    )
    parser.add_argument("--paced", type=int, default=200, help="requests saved below saturation (d) (default 200)")
    parser.add_argument("--pool", default=DISPATCH_POOL, help=f"the dispatch worker's pool (default {DISPATCH_POOL})")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DISPATCH_CONCURRENCY,
        help=f"the dispatch worker's processes or threads (default {DISPATCH_CONCURRENCY})",
    )
    parser.add_argument("--quick", action="store_true", help="--saves 40 --n 50 --paced 20 (for CI)")
    args = parser.parse_args()
    if args.quick:
        args.saves, args.n, args.paced = 40, 50, 20

    configure_environment(
        # No sweep runs here (no beat), and the grace must not matter: every event is published on commit.
        EMG_OUTBOX_GRACE_SECONDS="3600",
        # No runner serves the deployment, so every run made here would be marked Late 15 s on, a
        # state change per run that the server's late-runs service makes while the next phase
        # is measured (after the baseline's 2 x N runs: most of the server's CPU in the burst).
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
    )
    with BenchServices("event_latency") as services:
        services.redis()
        services.prefect_server()
        services.django_database()
        register_deployment()
        save_cost = measure_save_cost(args.saves)
        flush_broker()
        raw = {
            f"raw_creates_per_s_{threads}_thread{'s' if threads > 1 else ''}": measure_raw_create_rate(args.n, threads)
            for threads in (1, 2)
        }
        log(str(raw))
        start_consumer(services, args.pool, args.concurrency)
        burst = measure_burst(args.n)
        paced = measure_paced(args.paced, burst["events_per_s"] / 2)
    ceiling = max(raw.values())
    ratios = {
        "burst_ratio_to_raw_1_thread": round(burst["events_per_s"] / raw["raw_creates_per_s_1_thread"], 3),
        "burst_ratio_to_raw_best": round(burst["events_per_s"] / ceiling, 3),
    }
    emit(
        "event_latency",
        **save_cost,
        **raw,
        consumer_pool=args.pool,
        consumer_concurrency=args.concurrency,
        **burst,
        **ratios,
        **paced,
    )


def register_deployment() -> None:
    from flows.analysis import analyse_study
    from flows.deployments import ANALYSIS_DEPLOYMENT_NAME

    analyse_study.to_deployment(name=ANALYSIS_DEPLOYMENT_NAME).apply()


def seed_receiver(sender, instance, created: bool = False, raw: bool = False, **kwargs) -> None:
    """The seed system's trigger: create the flow run right inside post_save, synchronously."""
    from prefect.deployments import run_deployment

    from flows.deployments import ANALYSIS_DEPLOYMENT

    if created and not raw:
        run_deployment(
            ANALYSIS_DEPLOYMENT, parameters={"request_id": instance.id, "generation": instance.generation}, timeout=0
        )


def measure_save_cost(saves: int) -> dict:
    from django.db.models.signals import post_save

    from emg.models import AnalysisRequest, Study
    from emg.triggers import on_saved, saved_receiver_uid

    ours_uid = saved_receiver_uid(AnalysisRequest)
    study = Study.objects.create(accession="PRJEB40001")

    def use(way: str) -> None:
        post_save.disconnect(sender=AnalysisRequest, dispatch_uid=ours_uid)
        post_save.disconnect(sender=AnalysisRequest, dispatch_uid="bench.seed")
        if way == "ours":
            post_save.connect(on_saved, sender=AnalysisRequest, dispatch_uid=ours_uid, weak=False)
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
        "save_ms_p99_no_trigger": round(percentile(ms["none"], 99), 2),
        "save_ms_p99_ours": round(percentile(ms["ours"], 99), 2),
        "save_ms_p99_seed": round(percentile(ms["seed"], 99), 2),
        "added_ms_ours": round(median["ours"] - median["none"], 2),
        "added_ms_seed": round(median["seed"] - median["none"], 2),
        "added_ms_p99_ours": round(percentile(ms["ours"], 99) - percentile(ms["none"], 99), 2),
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


def measure_raw_create_rate(n: int, threads: int) -> float:
    """Flow runs per second that one kept client, the deployment id looked up once, gets from Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    from flows.deployments import ANALYSIS_DEPLOYMENT

    run = f"raw-{threads}"
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(ANALYSIS_DEPLOYMENT).id

        def create(number: int) -> None:
            client.create_flow_run_from_deployment(
                deployment_id,
                parameters={"request_id": number, "generation": 1},
                state=Scheduled(),
                idempotency_key=f"bench:{run}:{number}",
                name=f"{run}-{number}",
                tags=["emg", f"request-{number}"],
            )

        def create_all(numbers: range) -> None:
            for number in numbers:
                create(number)

        create(-1)  # the connection is open before the clock starts
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(create_all, [range(k, n, threads) for k in range(threads)]))
        elapsed = time.perf_counter() - started
    return round(n / elapsed, 1)


def start_consumer(services: BenchServices, pool: str, concurrency: int) -> None:
    """One dispatch worker (what the burst measures); no tick worker, no beat."""
    from devstack.processes import wait_until
    from devstack.stack import celery_worker, worker_answers

    node = f"bench-event-latency-{os.getpid()}"
    worker = celery_worker(
        "celery-worker", node, services.env(), services.log_dir, roles="dispatch", pool=pool, concurrency=concurrency
    ).start()
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
    wait_until(
        lambda: not AnalysisRequest.objects.filter(id__in=ids, flow_run_id__isnull=True).exists(),
        timeout=max(120, n),
        interval=0.2,
        message=f"all {n} requests have a flow run",
    )

    events = list(OutboxEvent.objects.filter(request__id__in=ids).values_list("created_at", "dispatched_at"))
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
    }
    log(str(figures))
    return figures


def measure_paced(n: int, rate: float) -> dict:
    """`n` saves at `rate` per second (below what the consumer sustains): save-to-flow-run latency."""
    from devstack.processes import wait_until
    from emg.models import AnalysisRequest, OutboxEvent, Study

    study = Study.objects.get(accession="PRJEB40001")
    ids = []
    started = time.perf_counter()
    for number in range(n):
        # On a schedule, not a sleep after each save: the rate holds whatever a save costs.
        delay = started + number / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ids.append(AnalysisRequest.objects.create(study=study).id)
    wait_until(
        lambda: not AnalysisRequest.objects.filter(id__in=ids, flow_run_id__isnull=True).exists(),
        timeout=max(120, n),
        interval=0.2,
        message=f"all {n} paced requests have a flow run",
    )
    events = list(OutboxEvent.objects.filter(request__id__in=ids).values_list("created_at", "dispatched_at"))
    latencies = [(dispatched - created).total_seconds() for created, dispatched in events]
    figures = {
        "paced_n": n,
        "paced_saves_per_s": round(rate, 1),
        "paced_latency_s_p50": round(percentile(latencies, 50), 3),
        "paced_latency_s_p99": round(percentile(latencies, 99), 3),
    }
    log(str(figures))
    return figures


if __name__ == "__main__":
    main()
