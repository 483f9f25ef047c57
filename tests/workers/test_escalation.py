"""Resources grow after OUT_OF_MEMORY and TIMEOUT, but never past what the partition can give."""

from emg.models import ClusterJob
from slurm_adapter import JobSpec, JobState, JobStatus, PartitionLimits
from workers.reconcile.job_states import escalated_spec


def ended(state: JobState) -> JobStatus:
    return JobStatus(
        job_id="1",
        state=state,
        raw_state=state.value,
        exit_code=0,
        signal=None,
        submit_time=None,
        start_time=None,
        end_time=None,
        tag=None,
    )


def job(memory_mb: int, minutes: int, retries: int = 0) -> ClusterJob:
    spec = JobSpec(name="grows", command=("true",), work_dir="/tmp", memory_mb=memory_mb, time_limit_minutes=minutes)
    return ClusterJob(
        spec=spec.to_dict(), policy={"max_attempts": 3, "memory_factor": 4, "time_factor": 4}, retries=retries
    )


def test_memory_grows_by_the_policy_factor_up_to_the_partition_nodes_memory():
    limits = PartitionLimits(max_memory_mb=3000, max_time_minutes=None)

    grown, reason = escalated_spec(job(500, 10), ended(JobState.OUT_OF_MEMORY), lambda: limits)
    assert grown.memory_mb == 2000 and "2000 MB" in reason
    capped, _ = escalated_spec(job(2000, 10), ended(JobState.OUT_OF_MEMORY), lambda: limits)
    assert capped.memory_mb == 3000
    assert escalated_spec(job(3000, 10), ended(JobState.OUT_OF_MEMORY), lambda: limits) is None


def test_time_grows_up_to_the_partition_time_limit():
    limits = PartitionLimits(max_memory_mb=None, max_time_minutes=60)

    capped, _ = escalated_spec(job(500, 30), ended(JobState.TIMEOUT), lambda: limits)
    assert capped.time_limit_minutes == 60
    assert escalated_spec(job(500, 60), ended(JobState.TIMEOUT), lambda: limits) is None


def test_no_retry_past_the_policys_attempts_and_none_for_a_real_failure():
    assert escalated_spec(job(500, 10, retries=2), ended(JobState.OUT_OF_MEMORY)) is None
    assert escalated_spec(job(500, 10), ended(JobState.FAILED)) is None


def test_limits_are_not_asked_for_when_the_retry_changes_no_resources():
    def no_call():
        raise AssertionError("partition limits read for a retry that needs none")

    spec, reason = escalated_spec(job(500, 10), ended(JobState.NODE_FAIL), no_call)
    assert spec.memory_mb == 500 and "as it was" in reason
