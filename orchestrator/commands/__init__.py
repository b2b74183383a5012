"""CLI commands, one per module; each registers itself on `orchestrator.cli.app`."""
