"""The experiments: each reproducible by one command, with a table, JSON and a plot."""
