"""Load tests for any OpenAI-compatible server: locustfiles, and the runner that turns a run into a report.

    moe-serve loadtest --url http://127.0.0.1:8000 --users 8 --duration 60 --out .data/loadtest

- `workload.py`   what to send (prompt lengths, output length, chat/completions mix, RAG, rate)
- `stream.py`     timing one streamed response: TTFT, inter-token latencies, end-to-end, output tokens
- `locustfile.py` the locust user (imported only inside the locust process: gevent patches the world)
- `summary.py`    per-request records -> percentiles, throughput, goodput, SLO verdicts
- `plots.py`      latency percentiles and throughput over time as PNGs
- `runner.py`     runs locust headless in a subprocess and writes the report

Nothing here imports Ray, and nothing outside `locustfile.py` imports locust.
"""
