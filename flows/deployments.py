"""Names of our Prefect flows and deployments, defined once: producers and the runner both use these."""

ANALYSIS_FLOW_NAME = "analyse-study"
ANALYSIS_DEPLOYMENT_NAME = "analysis-request"
ANALYSIS_DEPLOYMENT = f"{ANALYSIS_FLOW_NAME}/{ANALYSIS_DEPLOYMENT_NAME}"
