#!/usr/bin/env bash
# Time `make serve` on a fresh clone to the node's first answer (issue 16's target: 60 s where the llama.cpp
# wheel is already built in ~/.cache/edgegen/wheels). Then the size of the environment it made, and proof
# that no training framework, browser or test tool is in it.
#   bench/make_serve.sh [REPO]        (default: this repository; its committed HEAD is cloned)
set -euo pipefail
repo="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
work="$(mktemp -d /tmp/edgegen-make-serve.XXXXXX)"
port=8123
git clone -q "$repo" "$work/clone"
cd "$work/clone"
export EDGEGEN_HOME="$work/home"
start=$(date +%s.%N)
make serve PORT=$port >"$work/serve.log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; pkill -f "$work/clone/.venv/bin/python" || true' EXIT
until curl -sf -o /dev/null "http://127.0.0.1:$port/v2/health/ready"; do
  kill -0 $pid 2>/dev/null || { echo "make serve stopped:"; tail -20 "$work/serve.log"; exit 1; }
  sleep 0.2
done
ready=$(date +%s.%N)
key=$(.venv/bin/edgegen keys create --role user)
curl -sf -H "Authorization: Bearer $key" -H 'content-type: application/json' \
  -d '{"input_data": [0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]}' \
  "http://127.0.0.1:$port/predict" >/dev/null
answer=$(date +%s.%N)
echo "ready after $(echo "$ready - $start" | bc) s; first answer after $(echo "$answer - $start" | bc) s"
echo "site-packages: $(du -sh .venv/lib/python3.11/site-packages | cut -f1), $(.venv/bin/python -m pip list 2>/dev/null | tail -n +3 | wc -l) distributions"
.venv/bin/python -c "import importlib.util as u; print('absent:', [m for m in ('torch', 'sklearn', 'scipy', 'onnx', 'playwright', 'pytest') if u.find_spec(m) is None])"
