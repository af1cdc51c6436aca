"""Moving jobs forward: the reconciler, the phase merge of job.json and status.json, webhook delivery attempts."""
