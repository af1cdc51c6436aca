"""The names inside a job directory (`<state root>/tenants/<tenant>/jobs/<id>/`), relative to it.

The service writes the spec and its record there and reads the status and log; the trainer reads
the spec and writes everything else. Both sides name the keys from here.
"""

from __future__ import annotations

SPEC_KEY = "spec.json"  # the validated spec, written once at submit
JOB_KEY = "job.json"  # the service's record of the job (attempts, phase bookkeeping)
STATUS_KEY = "status.json"  # the trainer's heartbeat and final state
CANCEL_KEY = "cancel"  # an empty marker: its presence asks the trainer to stop
LOG_KEY = "logs/trainer.log"
TENSORBOARD_PREFIX = "logs/tensorboard/"
METRICS_KEY = "metrics.jsonl"  # the per-step loss/lr history the console plots
CHECKPOINTS_PREFIX = "checkpoints/"  # then <step:09d>/ holding the state and MANIFEST_NAME
MANIFEST_NAME = "manifest.json"  # a checkpoint's file list; written last, so its presence means complete
OUTPUT_PREFIX = "output/"  # the published outputs, unless the spec names another location

# Inside the output location, beside the adapters.
METADATA_NAME = "metadata.json"
DATASET_MANIFEST_NAME = "dataset-manifest.json"
CONFIG_NAME = SPEC_KEY  # the spec as the trainer ran it, published as an output
