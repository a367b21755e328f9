"""Pure decisions, no I/O: names, grants, credentials and path confinement."""
