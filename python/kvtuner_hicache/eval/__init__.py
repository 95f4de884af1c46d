"""Real-model accuracy harness for quantized HiCache pages: `python -m kvtuner_hicache.eval --help`.

Modules: models (cache, fetch, load), data (essays, GSM8K, MMLU), configs (names, sweeps),
harness (prefill, page round trip, scoring), report (records, markdown), cli (the command).
"""
