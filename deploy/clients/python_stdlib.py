"""Post a batch to nexus_gevent with the standard library only (urllib.request), resending after Retry-After."""

import json
import time
import urllib.error
import urllib.request
import uuid


def post_batch(url: str, token: str, entries: list[dict[str, object]], attempts: int = 5) -> dict[str, object]:
    """POST `entries` as one JSON array to `url` (.../inbound/<source>); the service's answer."""
    request = urllib.request.Request(  # noqa: S310 - the caller's http(s) URL
        url,
        data=json.dumps(entries).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Idempotency-Key": uuid.uuid4().hex,  # one key per batch, the same for every resend
        },
    )
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                answer: dict[str, object] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read())
            if "payload_ids" in answer:
                return answer  # a durable 429 carries payload_ids: stored, do not resend
            if error.code not in (429, 502, 503, 504) or attempt == attempts - 1:
                raise RuntimeError(f"{error.code}: {answer}") from error
            time.sleep(float(error.headers.get("Retry-After", "1")))
    raise AssertionError("unreachable")
