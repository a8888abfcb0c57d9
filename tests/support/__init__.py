"""Helpers shared by tests: real gunicorn processes and an HTTP client that keeps a ledger."""
