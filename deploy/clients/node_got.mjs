// Post a batch to nexus_gevent with got (npm install got), which resends on 429/502/503/504
// after Retry-After; POST must be allowed explicitly, the Idempotency-Key makes it safe.
import { randomUUID } from "node:crypto";
import got from "got";

export async function postBatch(url, token, entries) {
  const response = await got.post(url, {
    json: entries,
    headers: {
      "Authorization": `Bearer ${token}`,
      "Idempotency-Key": randomUUID(), // one key per batch, the same for every resend
    },
    retry: { limit: 5, methods: ["POST"], statusCodes: [429, 502, 503, 504] },
    timeout: { request: 30_000 },
    throwHttpErrors: false,
    responseType: "json",
  });
  // A durable 429 carries payload_ids: stored, do not resend.
  if (response.statusCode < 300 || response.body.payload_ids) return response.body;
  throw new Error(`${response.statusCode}: ${JSON.stringify(response.body)}`);
}
