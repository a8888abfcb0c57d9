"""The WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`.

Imported in each gunicorn worker after gevent's monkey-patching, never in the
master (no preload_app), so every worker starts its own WAL, queues and threads.
"""

from nexus_gevent.lifecycle import boot

app = boot()
