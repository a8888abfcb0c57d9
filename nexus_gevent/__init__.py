"""nexus_gevent: a durable HTTP ingest service on gunicorn + gevent."""

__version__ = "0.1.0"
