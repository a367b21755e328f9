"""Alembic migrations of the control database (``medbridge platform migrate`` runs them)."""
