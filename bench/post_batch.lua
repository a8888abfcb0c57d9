-- wrk script: POST NEXUS_BENCH_ENTRIES entries of about 250 bytes per request, and count
-- answers by status. One entry: a JSON object (application/json); more: NDJSON.
-- The token comes from the environment (NEXUS_BENCH_TOKEN), never from a file in git.
local token = os.getenv("NEXUS_BENCH_TOKEN") or "none"
local entries = tonumber(os.getenv("NEXUS_BENCH_ENTRIES") or "100")
-- 250 bytes with its newline: the fields, then padding to the length.
local function entry(n)
  local head = string.format('{"sensor":"s-%05d","reading":21.5,"unit":"C","tags":["bench","batch"],"n":%d,"pad":"', n, n)
  return head .. string.rep("x", 249 - #head - 2) .. '"}'
end
local lines = {}
for i = 1, entries do
  lines[i] = entry(i)
end
wrk.method = "POST"
if entries == 1 then
  wrk.body = lines[1]
  wrk.headers["Content-Type"] = "application/json"
else
  wrk.body = table.concat(lines, "\n") .. "\n"
  wrk.headers["Content-Type"] = "application/x-ndjson"
end
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
