"""The HTTP kit a node and a gateway both stand on, so that both answer the web the same way.

errors       the error boundary: one status per edgegen error, in the seed's and OpenAI's shapes
middleware   request ids, limits on heads and bodies, the access log and the latency histogram
responses    JSON answers
serving      the TLS context a node and a gateway listen with under uvicorn

It sits below both apps and imports neither `edgegen.node` nor `edgegen.gateway`, so that what one
app needs from the web the other gets from the same code, and neither app reaches into the other.
"""
