from django.db.models.signals import post_save
from django.dispatch import receiver

from emg.models import AnalysisRequest
from emg.outbox import publish_after_commit, record_run_event


@receiver(post_save, sender=AnalysisRequest, dispatch_uid="emg.analysis_request_run_event")
def on_analysis_request_saved(
    sender, instance: AnalysisRequest, created: bool = False, raw: bool = False, **kwargs
) -> None:
    """A new request, or a new generation of one, gets one run event in the same transaction."""
    if raw:  # loading fixtures must not start pipelines
        return
    event = record_run_event(instance, new_request=created)
    if event is not None:
        publish_after_commit(event)
