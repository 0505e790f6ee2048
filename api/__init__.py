"""The HTTP API: validates, writes job state, enqueues tasks, answers status and downloads."""
