"""Flow-run leases: a runner's renewals, and the reconciler's revocation of stale ones only."""

import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from emg import leases
from emg.models import FlowRunLease

pytestmark = pytest.mark.django_db


def test_renewal_creates_and_refreshes_leases_and_takes_over_another_process_lease():
    first, second = uuid.uuid4(), uuid.uuid4()
    leases.renew("host-a", {first: 101})
    renewed = FlowRunLease.objects.get(flow_run_id=first).renewed_at
    leases.renew("host-b", {first: 202, second: 203})  # re-run on another host: it is that process's now
    assert {(lease.flow_run_id, lease.host, lease.pid) for lease in FlowRunLease.objects.all()} == {
        (first, "host-b", 202),
        (second, "host-b", 203),
    }
    assert FlowRunLease.objects.get(flow_run_id=first).renewed_at >= renewed


def test_release_removes_only_the_leases_still_held_by_those_processes():
    run = uuid.uuid4()
    leases.renew("host-a", {run: 101})
    leases.renew("host-b", {run: 202})
    assert leases.release("host-a", {run: 101}) == 0  # the old process's release takes nothing from the new one
    assert FlowRunLease.objects.filter(flow_run_id=run, pid=202).exists()
    assert leases.release("host-b", {run: 202}) == 1
    assert not FlowRunLease.objects.exists()


def test_only_a_lease_not_renewed_since_the_cutoff_is_revoked():
    fresh_run, stale_run, unleased_run = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    leases.renew("host", {fresh_run: 1, stale_run: 2})
    FlowRunLease.objects.filter(flow_run_id=stale_run).update(renewed_at=timezone.now() - timedelta(minutes=5))
    cutoff = timezone.now() - timedelta(minutes=1)
    assert leases.fresh([fresh_run, stale_run, unleased_run], cutoff) == {fresh_run}
    with transaction.atomic():
        assert leases.revoke_stale(fresh_run, cutoff) is False
        assert leases.revoke_stale(stale_run, cutoff) is True
        assert leases.revoke_stale(unleased_run, cutoff) is True  # no runner vouches for it
    assert set(FlowRunLease.objects.values_list("flow_run_id", flat=True)) == {fresh_run}


@pytest.mark.django_db(transaction=True)
def test_revocation_refuses_to_decide_outside_a_transaction():
    with pytest.raises(RuntimeError, match="inside the re-run's transaction"):
        leases.revoke_stale(uuid.uuid4(), timezone.now())
