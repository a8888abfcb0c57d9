// Post a batch to nexus_gevent with Node's built-in fetch (Node 18+), resending on
// 429/502/503/504 after Retry-After with the same Idempotency-Key.
import { randomUUID } from "node:crypto";

export async function postBatch(url, token, entries, attempts = 5) {
  const init = {
    method: "POST",
    headers: {
      "Authorization": `Bearer ${token}`,
      "Content-Type": "application/json",
      "Idempotency-Key": randomUUID(), // one key per batch, the same for every resend
    },
    body: JSON.stringify(entries),
    signal: AbortSignal.timeout(30_000),
  };
  for (let attempt = 1; ; attempt++) {
    const response = await fetch(url, init);
    const answer = await response.json();
    // A durable 429 carries payload_ids: stored, do not resend.
    if (response.ok || answer.payload_ids) return answer;
    if (![429, 502, 503, 504].includes(response.status) || attempt >= attempts) {
      throw new Error(`${response.status}: ${JSON.stringify(answer)}`);
    }
    const seconds = Number(response.headers.get("retry-after") ?? "1");
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }
}
