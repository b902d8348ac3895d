"""Load generator: prefix-heavy workloads, an open/closed-loop streaming client, SGLang/vLLM metrics.

Torch-free: it needs only aiohttp, orjson, numpy, matplotlib (plots) and ``cache.prompt.tokenizer``.

- ``workloads/``: token-exact prompts (shared prefix, multi-turn chat, long-document QA, random control).
- ``prompts.py``: turns a workload turn into an OpenAI request body (chat or completions, text or token ids).
- ``client.py``: one streamed request -> ``RequestRecord`` (chunk timeline, usage, errors).
- ``runner.py``: warm-up, Poisson or closed-loop dispatch, multi-turn conversations.
- ``metrics.py``: TTFT/TPOT/ITL/E2E, throughput, goodput, cache-hit rate as SGLang/vLLM define them.
- ``reuse.py``: the reusable fraction an ideal prefix cache could serve, given arrival order.
- ``report.py`` / ``plots.py``: console tables, JSON/JSONL, PNG plots; ``cli.py``: ``python -m loadgen``.
"""
