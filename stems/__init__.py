"""Service plumbing shared by the API, the workers and the CLI: settings, storage, job state."""
