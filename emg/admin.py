from django.conf import settings
from django.contrib import admin
from django.utils.html import format_html

from emg.models import AnalysisRequest, ClusterJob, JobWait, OutboxEvent, Study


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = ["accession", "title", "created_at"]
    search_fields = ["accession", "title"]


@admin.register(AnalysisRequest)
class AnalysisRequestAdmin(admin.ModelAdmin):
    list_display = ["id", "study", "status", "current_step", "generation", "flow_run_link", "created_at"]
    list_filter = ["status"]
    search_fields = ["study__accession"]
    readonly_fields = ["flow_run_link", "created_at", "updated_at", "finished_at"]

    @admin.display(description="Prefect flow run")
    def flow_run_link(self, obj: AnalysisRequest):
        if not obj.flow_run_id:
            return "-"
        return format_html('<a href="{}/runs/flow-run/{}">{}</a>', settings.PREFECT_UI_URL, obj.flow_run_id,
                           obj.flow_run_id)


@admin.register(ClusterJob)
class ClusterJobAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "slurm_job_id", "state", "exit_code", "attempts", "state_checked_at"]
    list_filter = ["state"]
    search_fields = ["slurm_job_id", "name", "fingerprint"]
    readonly_fields = ["fingerprint", "history", "created_at", "updated_at"]


@admin.register(JobWait)
class JobWaitAdmin(admin.ModelAdmin):
    list_display = ["flow_run_id", "step", "job", "request", "suspensions", "released_at"]


@admin.register(OutboxEvent)
class OutboxEventAdmin(admin.ModelAdmin):
    list_display = ["id", "topic", "request", "generation", "created_at", "publish_attempts", "dispatched_at"]
    list_filter = ["topic"]
