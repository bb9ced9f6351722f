"""What every job's driver shares: the command line and launch checks, joining Ray, the named-run
lifecycle (lock, config record, MLflow tracking and status) and the resources a run needs.
"""
