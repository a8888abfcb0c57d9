-- The pacing of bench/post_rate.lua and bench/post_batch_rate.lua, loaded after the
-- script whose requests and counts they pace (its init() is wrapped).
--
--   NEXUS_BENCH_RATE         requests/s wanted, over all connections
--   NEXUS_BENCH_CONNECTIONS  wrk's -c (Lua cannot read it from wrk)
--
-- wrk's delay() hook: before each request, a connection waits `connections / rate`
-- seconds on average. The wait is drawn uniformly from 0.5x to 1.5x that mean, so the
-- connections, which all start together, do not stay in lock-step and fire in bursts.
-- The wait comes after the previous response, so the rate reached is lower than asked
-- by each request's own latency; wrk's latency starts when the request is sent, after
-- the wait. Plain wrk has no -R (that is wrk2).
local rate = tonumber(os.getenv("NEXUS_BENCH_RATE") or "0")
local connections = tonumber(os.getenv("NEXUS_BENCH_CONNECTIONS") or "1")
if rate <= 0 then
  error("NEXUS_BENCH_RATE must be a positive number of requests/s")
end
local mean_ms = 1000 * connections / rate

local counting_init = init
function init(args)
  counting_init(args)
  -- Each thread its own sequence (a table's address differs per Lua state).
  local salt = tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0
  math.randomseed(os.time() + salt % 1000003)
end

function delay()
  return mean_ms * (0.5 + math.random())
end
