"""The HTTP face of the service (Falcon WSGI)."""
