"""The run tags the platform reads and writes, named once: Dagster's own (stored with every run and shown in the UI,
but exported only from Dagster's private modules) and the platform's."""

# Dagster's
PARTITION = "dagster/partition"
WILL_RETRY = "dagster/will_retry"  # the retry daemon's verdict on a failed run: "true" or "false"
AUTO_RETRY_RUN_ID = "dagster/auto_retry_run_id"  # on a failed run, the run that retries it
FAILURE_REASON = "dagster/failure_reason"
STEP_FAILURE = "STEP_FAILURE"  # the failure reason of a run one of whose steps failed (an asset raised)

# The platform's
SOURCE_FILE = "readmission/source_file"
SHA = "readmission/sha256"
AFTER_CRASH_OF = "readmission/after_crash_of"
NEWEST_BATCH = "readmission/newest_batch"
TRIGGER = "readmission/trigger"  # why a retrain runs: new_data, drift, live_performance
NEW_BATCHES = "readmission/new_batches"
DRIFTED_BATCHES = "readmission/drifted_batches"
AFTER_OUTCOMES = "readmission/after_outcomes"  # the file of outcomes whose arrival a measurement follows
