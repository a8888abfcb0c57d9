-- wrk script: bench/post.lua's requests and counts, at a target rate instead of flat out
-- (NEXUS_BENCH_RATE, NEXUS_BENCH_CONNECTIONS; the pacing is bench/pace.lua's).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post.lua")
dofile(here .. "pace.lua")
