"""Alembic migrations of the records database (``gateway/records.py`` holds the schema)."""
