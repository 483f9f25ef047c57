"""Names of our Prefect flows and deployments, defined once: producers and the runner both use these."""

ANALYSIS_FLOW_NAME = "analyse-study"
ANALYSIS_DEPLOYMENT_NAME = "analysis-request"
ANALYSIS_DEPLOYMENT = f"{ANALYSIS_FLOW_NAME}/{ANALYSIS_DEPLOYMENT_NAME}"
# The trigger (flows.triggers) that starts it: with the run key, the flow runs' idempotency keys.
ANALYSIS_TRIGGER = "analysis-request"

# Raw-reads QC of a study created flagged for processing (flows.read_qc, trigger in flows.triggers).
READ_QC_FLOW_NAME = "qc-raw-reads"
READ_QC_DEPLOYMENT = f"{READ_QC_FLOW_NAME}/study-created"
READ_QC_TRIGGER = "study-created-qc"

# A study processed end to end: QC and analysis as child flows, then its report (flows.process_study).
PROCESS_STUDY_FLOW_NAME = "process-study"
PROCESS_STUDY_DEPLOYMENT = f"{PROCESS_STUDY_FLOW_NAME}/study-report"
PROCESS_STUDY_TRIGGER = "study-report"
