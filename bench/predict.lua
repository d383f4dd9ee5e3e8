-- wrk script for bench/predict.py: POST /predict with real digit images, and check every answer.
--
--   wrk -t C -c C -d 5s -s bench/predict.lua http://127.0.0.1:PORT -- DATA_FILE [PATH [CHECK [KEY]]]
--
-- CHECK is "values" (default: the answer must carry the expected logits) or "shape" (any 10 numbers will
-- do: for the floor, which answers a constant). KEY, when given, goes in `Authorization: Bearer KEY`.
-- DATA_FILE holds one sample a line: the JSON body, a tab, then the 10 expected logits separated by spaces
-- (bench/predict.py computes them in-process with ONNX Runtime). Each thread cycles through all the bodies
-- from its own offset. Run one connection per thread (-t C -c C): without pipelining HTTP/1.1 answers in
-- order on one connection, so the answer that arrives is the answer to the last request this thread sent,
-- and one that carries another request's prediction counts as wrong.
-- done() prints one line: BENCH_JSON {...} with the counters summed over threads and the latency percentiles.

local TOLERANCE = 1e-3 -- abs + rel

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local requests = {}
local expected = {}
local count = 0
local current = 0 -- index of the request in flight on this thread's only connection
local position = 0
local values = true

correct = 0
wrong = 0
non200 = 0

function init(args)
  local data_file = args[1]
  local path = args[2] or "/predict"
  values = (args[3] or "values") ~= "shape"
  local headers = { ["Content-Type"] = "application/json" }
  if args[4] and args[4] ~= "" then
    headers["Authorization"] = "Bearer " .. args[4]
  end
  for line in io.lines(data_file) do
    local body, logits = line:match("^(.-)\t(.*)$")
    local numbers = {}
    for token in logits:gmatch("%S+") do
      numbers[#numbers + 1] = tonumber(token)
    end
    count = count + 1
    requests[count] = wrk.format("POST", path, headers, body)
    expected[count] = numbers
  end
  -- Spread the threads over the samples so that concurrent requests carry different images.
  position = (tid * 37) % count
end

function request()
  position = position % count + 1
  current = position
  return requests[current]
end

local function matches(body, want)
  local prediction = body:match('"prediction"%s*:%s*(%b[])')
  if not prediction then
    return false
  end
  local n = 0
  for token in prediction:gmatch("[%-%+%d%.eE]+") do
    n = n + 1
    local got = tonumber(token)
    local exp = want[n]
    if got == nil or exp == nil then
      return false
    end
    if values and math.abs(got - exp) > TOLERANCE + TOLERANCE * math.abs(exp) then
      return false
    end
  end
  return n == #want
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  elseif matches(body, expected[current]) then
    correct = correct + 1
  else
    wrong = wrong + 1
  end
end

function done(summary, latency, _)
  local totals = { correct = 0, wrong = 0, non200 = 0 }
  for _, thread in ipairs(threads) do
    for key, value in pairs(totals) do
      totals[key] = value + (thread:get(key) or 0)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "correct": %d, "wrong": %d, "non_200": %d, "socket_errors": %d, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, "duration_us": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, totals.correct, totals.wrong, totals.non200,
    e.connect + e.read + e.write + e.timeout, e.connect, e.read, e.write, e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max
  ))
end
