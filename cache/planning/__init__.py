"""Sizing prefill and decode pools: what a worker measures about its own speed (``load_profile``) and
how many prefill, decode or mixed workers a workload needs under TTFT and ITL targets (``pd_advice``).
Pure Python, no I/O: the engine records, the gateway and the load generator advise."""
