"""Every write of a FlowRunLease: renewed by the runner that holds the process, revoked by the reconciler.

The runner renews, in one statement, a lease per flow-run process it has started and that still
exists (a SIGSTOPped process still exists: it would continue), and releases the lease of a process
it no longer has. The reconciler takes a heartbeat-less run for a zombie only if it can revoke its
lease, a compare-and-set on staleness: inside the transaction that counts the re-run, so either
the lease is revoked and the re-run counted, or neither (a runner that renews meanwhile wins).
"""

from datetime import datetime
from uuid import UUID

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from emg.models import FlowRunLease


def renew(host: str, processes: dict[UUID, int]) -> None:
    """These flow runs have a live process on `host` (flow run id -> pid): their leases are renewed,
    taken over from whatever process held them before (the run was re-run here, or the runner restarted)."""
    if not processes:
        return
    now = timezone.now()
    FlowRunLease.objects.bulk_create(
        [
            FlowRunLease(flow_run_id=flow_run_id, host=host, pid=pid, renewed_at=now)
            for flow_run_id, pid in processes.items()
        ],
        update_conflicts=True,
        unique_fields=["flow_run_id"],
        update_fields=["host", "pid", "renewed_at"],
    )


def release(host: str, processes: dict[UUID, int]) -> int:
    """These processes have ended: their leases go, unless another process holds them now."""
    if not processes:
        return 0
    mine = Q()
    for flow_run_id, pid in processes.items():
        mine |= Q(flow_run_id=flow_run_id, host=host, pid=pid)
    deleted, _ = FlowRunLease.objects.filter(mine).delete()
    return deleted


def fresh(flow_run_ids: list[UUID], since: datetime) -> set[UUID]:
    """Runs among these whose lease was renewed since `since`: they have a live process."""
    return set(
        FlowRunLease.objects.filter(flow_run_id__in=flow_run_ids, renewed_at__gte=since).values_list(
            "flow_run_id", flat=True
        )
    )


def revoke_stale(flow_run_id: UUID, since: datetime) -> bool:
    """Within the caller's transaction: True if the run has no lease renewed since `since` (its stale
    lease, if any, is deleted), False if it has a fresh one. The lease row stays locked until the
    caller commits, so a renewal waits for the outcome and cannot be lost in between."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("revoke_stale decides inside the re-run's transaction, which holds the lease's lock")
    leases = list(FlowRunLease.objects.select_for_update().filter(flow_run_id=flow_run_id))
    if any(lease.renewed_at >= since for lease in leases):
        return False
    if leases:
        FlowRunLease.objects.filter(flow_run_id=flow_run_id, renewed_at__lt=since).delete()
    return True


def forget_stale(before: datetime) -> int:
    """Leases no runner has renewed since `before` (their runner died, with its processes): gone."""
    deleted, _ = FlowRunLease.objects.filter(renewed_at__lt=before).delete()
    return deleted
