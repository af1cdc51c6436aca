"""The service's state, all in the object store: the job store and the webhook outbox."""
