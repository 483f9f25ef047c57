"""The parcel's trigger, as a flow's author declares it: a parcel paid starts a courier's run."""

from emg import triggers
from tests.triggerapp.models import Parcel

COURIER_DEPLOYMENT = "deliver-parcel/paid-parcel"

paid_parcel = triggers.on_change(
    Parcel,
    field="status",
    to=Parcel.Status.PAID,
    name="paid-parcel",
    deployment=COURIER_DEPLOYMENT,
    flow="tests.triggerapp.courier.deliver_parcel",
    parameters=lambda parcel: {"parcel_id": parcel.id, "label": parcel.label},
    run_key=lambda parcel: f"parcel:{parcel.id}",
    # A parcel delivered (by an earlier run, found again) needs no run.
    is_current=lambda parcel, event: parcel.status != Parcel.Status.DELIVERED,
)
