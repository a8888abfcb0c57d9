-- wrk script: bench/post_batch.lua's batches and counts, at a target rate instead of flat
-- out (NEXUS_BENCH_RATE, NEXUS_BENCH_CONNECTIONS; the pacing is bench/pace.lua's).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post_batch.lua")
dofile(here .. "pace.lua")
