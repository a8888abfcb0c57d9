"""One child process of bench.per_request: the app's CPU per request with no server and no sockets.

    python -m bench._inproc_app bare|service REQUESTS

Gevent-patched like a worker. 64 greenlets call the WSGI app directly with the same
POST as bench/post.lua (the service with its SQLite destination delivering meanwhile),
and the process's CPU time (all threads) per request is printed as JSON.
"""

from gevent import monkey

monkey.patch_all()

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

#: bench/post.lua's body.
BODY = b'{"sensor":"s-17","reading":21.5,"unit":"C","tags":["bench","loopback"],"n":12345}'
GREENLETS = 64
WARM_UP = 2_000

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ(token: str) -> dict[str, Any]:
    """What gunicorn hands the app for wrk's POST."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/inbound/default",
        "QUERY_STRING": "",
        "RAW_URI": "/inbound/default",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "HTTP_AUTHORIZATION": f"Bearer {token}",
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.input": io.BytesIO(BODY),
        "wsgi.input_terminated": True,
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def run(app: App, token: str, total: int, statuses: dict[str, int]) -> None:
    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        statuses[status] = statuses.get(status, 0) + 1

    def loop(n: int) -> None:
        for _ in range(n):
            b"".join(app(environ(token), start_response))

    gevent.joinall([gevent.spawn(loop, total // GREENLETS) for _ in range(GREENLETS)])


def main() -> None:
    which, total = sys.argv[1], int(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="nexus-inproc-")
    token = "bench-inproc-" + os.urandom(8).hex()
    os.environ.update(
        NEXUS_DATA_DIR=os.path.join(tmp, "data"),
        NEXUS_TOKEN=token,
        NEXUS_ADMIN_TOKEN="bench-inproc-admin-" + os.urandom(8).hex(),
        NEXUS_LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=os.path.join(tmp, "metrics"),
    )
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    lifecycle: Any = None
    if which == "bare":
        from .bare_app import app
    else:
        from nexus_gevent import lifecycle

        app = lifecycle.boot()
        lifecycle.current().wait_ready(60)
    statuses: dict[str, int] = {}
    run(app, token, WARM_UP, statuses)
    statuses.clear()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run(app, token, total, statuses)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    done = sum(statuses.values())
    if lifecycle is not None:
        lifecycle.shutdown(30)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(
        json.dumps(
            {
                "app": which,
                "requests": done,
                "statuses": statuses,
                "cpu_us_per_request": (user + system) / done * 1e6,
                "user_us_per_request": user / done * 1e6,
                "system_us_per_request": system / done * 1e6,
                "wall_us_per_request": wall / done * 1e6,
            }
        )
    )


if __name__ == "__main__":
    main()
