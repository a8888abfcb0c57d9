"""Post a batch to nexus_gevent with requests (and urllib3's Retry under it), as NDJSON."""

import json
import uuid

import requests
from requests.adapters import HTTPAdapter
from urllib3 import Retry

SESSION = requests.Session()
SESSION.mount(
    "http://",
    HTTPAdapter(
        max_retries=Retry(
            total=5,
            backoff_factor=0.5,
            status_forcelist=[429, 502, 503, 504],
            allowed_methods=None,  # POST too: the Idempotency-Key makes a resend safe
            respect_retry_after_header=True,
            raise_on_status=False,
        )
    ),
)
SESSION.mount("https://", SESSION.get_adapter("http://"))


def post_batch(url: str, token: str, entries: list[dict[str, object]]) -> dict[str, object]:
    """POST `entries` as NDJSON (one object a line) to `url` (.../inbound/<source>); the service's answer."""
    response = SESSION.post(
        url,
        data="".join(json.dumps(entry) + "\n" for entry in entries).encode(),
        headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": uuid.uuid4().hex},
        auth=("nexus", token),  # Basic auth, the token as the password; or a Bearer header
        timeout=(5, 30),
    )
    answer: dict[str, object] = response.json()
    if response.status_code not in (200, 202, 429) or (response.status_code == 429 and "payload_ids" not in answer):
        raise RuntimeError(f"{response.status_code}: {answer}")
    return answer
