-- wrk script: POST one JSON body, read from a file, again and again; for latency at one fixed request.
--
--   wrk -t 1 -c 1 -d 5s -s bench/post.lua http://127.0.0.1:PORT/PATH -- BODY_FILE
--
-- done() prints one line: BENCH_JSON {...} with the request count, answers that were not 2xx, and the
-- latency percentiles in microseconds.

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  wrk.headers["Content-Type"] = "application/json"
  file:close()
end

function done(summary, latency, requests)
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "non_2xx": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "duration_us": %d}\n',
    summary.requests, summary.errors.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), summary.duration))
end
