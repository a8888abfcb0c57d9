"""Post a gzip-compressed batch to nexus_gevent with httpx, resending on 429/503 after Retry-After."""

import gzip
import json
import time
import uuid

import httpx

CLIENT = httpx.Client(timeout=httpx.Timeout(30, connect=5), transport=httpx.HTTPTransport(retries=3))


def post_batch(url: str, token: str, entries: list[dict[str, object]], attempts: int = 5) -> dict[str, object]:
    """POST `entries` as one gzip'd JSON array to `url` (.../inbound/<source>); the service's answer."""
    body = gzip.compress(json.dumps(entries).encode())
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "Idempotency-Key": uuid.uuid4().hex,  # one key per batch, the same for every resend
    }
    for attempt in range(attempts):
        response = CLIENT.post(url, content=body, headers=headers)
        answer: dict[str, object] = response.json()
        if response.status_code in (200, 202) or "payload_ids" in answer:
            return answer  # a durable 429 carries payload_ids: stored, do not resend
        if response.status_code not in (429, 502, 503, 504) or attempt == attempts - 1:
            raise RuntimeError(f"{response.status_code}: {answer}")
        time.sleep(float(response.headers.get("Retry-After", "1")))
    raise AssertionError("unreachable")
