-- wrk script: POST one OTLP/HTTP protobuf ExportLogsServiceRequest (bench/otlp.py writes it to
-- the file NEXUS_BENCH_BODY names) to /v1/logs, and count answers by status.
-- The token comes from the environment (NEXUS_BENCH_TOKEN), never from a file in git.
local token = os.getenv("NEXUS_BENCH_TOKEN") or "none"
local file = assert(io.open(os.getenv("NEXUS_BENCH_BODY"), "rb"))
wrk.body = file:read("*a")
file:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-protobuf"
wrk.headers["Authorization"] = "Bearer " .. token

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do
      totals[code] = (totals[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(totals) do
    table.insert(parts, string.format('"%d": %d', code, n))
  end
  io.write(string.format('STATUSES {%s}\n', table.concat(parts, ", ")))
  io.write(string.format('LATENCY_US p50=%d p99=%d max=%d\n',
    latency:percentile(50), latency:percentile(99), latency.max))
end
