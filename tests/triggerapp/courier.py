"""The courier: a Prefect flow that records, on its parcel, that it ran and with what.

(Not named flows.py: Prefect loads a flow's file as a package of its own directory, and that name
would then hide the product's `flows` package from the flow-run process.)"""

from flows.django_setup import setup_django

setup_django()

from django.db.models import F  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from tests.triggerapp.models import Parcel  # noqa: E402

COURIER_FLOW_NAME = "deliver-parcel"


@flow(name=COURIER_FLOW_NAME, log_prints=True)
def deliver_parcel(parcel_id: int, label: str) -> str:
    note = f"flow run {flow_run.get_id()} for {label}"
    # Counted, so a second run for the same parcel would show.
    Parcel.objects.filter(id=parcel_id).update(
        status=Parcel.Status.DELIVERED, delivered_by=note, deliveries=F("deliveries") + 1
    )
    return note
