"""The orchestrator as a service: an HTTP API over the archive, with job drivers running inside it."""
