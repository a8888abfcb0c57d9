-- wrk script: bench/post_batch.lua's batches and counts, at a target rate instead of flat out.
--
--   NEXUS_BENCH_RATE         requests/s wanted, over all connections
--   NEXUS_BENCH_CONNECTIONS  wrk's -c (Lua cannot read it from wrk)
--
-- The pacing of bench/post_rate.lua: before each request a connection waits
-- `connections / rate` seconds on average, drawn from 0.5x to 1.5x that mean so the
-- connections do not fire in lock-step. The wait follows the previous response, so the
-- rate reached is a little lower than asked; the bench reads the rate reached.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post_batch.lua")

local rate = tonumber(os.getenv("NEXUS_BENCH_RATE") or "0")
local connections = tonumber(os.getenv("NEXUS_BENCH_CONNECTIONS") or "1")
if rate <= 0 then
  error("NEXUS_BENCH_RATE must be a positive number of requests/s")
end
local mean_ms = 1000 * connections / rate

local counting_init = init
function init(args)
  counting_init(args)
  local salt = tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0
  math.randomseed(os.time() + salt % 1000003)
end

function delay()
  return mean_ms * (0.5 + math.random())
end
