"""Post a batch to nexus_gevent with urllib3, resending on 429/502/503/504 after Retry-After."""

import json
import uuid

import urllib3

RETRY = urllib3.Retry(
    total=5,
    backoff_factor=0.5,
    status_forcelist=[429, 502, 503, 504],
    allowed_methods=None,  # POST too: the Idempotency-Key makes a resend safe
    respect_retry_after_header=True,
    raise_on_status=False,
)
HTTP = urllib3.PoolManager(retries=RETRY, timeout=urllib3.Timeout(connect=5, read=30))


def post_batch(url: str, token: str, entries: list[dict[str, object]]) -> dict[str, object]:
    """POST `entries` as one JSON array to `url` (.../inbound/<source>); the service's answer."""
    response = HTTP.request(
        "POST",
        url,
        body=json.dumps(entries).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            # One key per batch, the same for every resend of it.
            "Idempotency-Key": uuid.uuid4().hex,
        },
    )
    answer: dict[str, object] = json.loads(response.data)
    if response.status not in (200, 202, 429):
        raise RuntimeError(f"{response.status}: {answer}")
    # 429 queue_full under the durable policy carries payload_ids: stored, do not resend.
    if response.status == 429 and "payload_ids" not in answer:
        raise RuntimeError(f"429 after every retry: {answer}")
    return answer
