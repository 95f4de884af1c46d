"""A real SGLang server (the installed release) on this CPU machine with the plugin, launched from its own
command line (`scripts/cpu/serve.sh`): the seed's flags plus --kvtuner-hicache-elastic on smollm2-135m.

Checks what a user would: the plugin's start-up lines, a prefix evicted from the device pool comes back
from the host pool at the top precision (SGLang's own cached_tokens_details and our Prometheus series on
/metrics), greedy output equal to the recomputed one, and a demoted page served at the floor once the host
pool fills. One server for the module (about 30 s to start). Run by scripts/test.sh on the pinned release.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
import sys
import urllib.request

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmark"))
import cpu_server  # noqa: E402

pytestmark = pytest.mark.server
REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = REPO / ".cache" / "models" / "smollm2-135m" / "hf"
PORT = 31123
URL = f"http://127.0.0.1:{PORT}"
DEVICE_TOKENS = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (MODEL / "config.json").exists():
        pytest.fail(f"{MODEL} missing: run bash scripts/fetch_models.sh smollm2-135m")
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = cpu_server.start(["--model-path", str(MODEL), "--max-total-tokens", str(DEVICE_TOKENS),
                             "--hicache-ratio", "1.0", "--enable-metrics", "--enable-cache-report",
                             "--skip-tokenizer-init", "--enable-hierarchical-cache", "--enable-kvtuner-hicache",
                             "--kvtuner-hicache-nbits-key", "4", "--kvtuner-hicache-nbits-value", "4",
                             "--kvtuner-hicache-elastic"], PORT, log)
    try:
        yield log
    finally:
        cpu_server.stop(proc)


def _generate(ids: list[int]) -> dict:
    body = {"input_ids": ids, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(f"{URL}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=300).read())


def _metric(name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"{URL}/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _prompt(seed: int, n: int = 448) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 48000) for _ in range(n)]


def test_start_up_names_the_elastic_pool(server):
    text = server.read_text()
    assert re.search(r"kvtuner_hicache enabled: K4cV4t-a-g64, elastic", text)
    assert re.search(r"kvtuner_hicache elastic host pool: \d+ pages; at the floor", text)
    assert "codec=reference" in text  # CPU device pool: the reference codec, named in the start-up line


def test_evicted_prefix_comes_back_from_host_at_the_top_and_matches_recompute(server):
    first = _generate(_prompt(1))
    for seed in (2, 3, 4):  # 3 x 448 tokens more than the 1024-token device pool holds: prompt 1 is evicted
        _generate(_prompt(seed))
    hits8 = _metric("sglang:kvtq_elastic_hit_tokens_total", bits="8")
    again = _generate(_prompt(1))
    host = (again["meta_info"].get("cached_tokens_details") or {}).get("host", 0)
    assert host >= 384, again["meta_info"]  # whole pages of the 448-token prompt came from the host pool
    assert _metric("sglang:kvtq_elastic_hit_tokens_total", bits="8") - hits8 == host
    # the first new token is decided by the prefix KV alone: 8-bit-class pages give the recomputed token with
    # nearly its log-probability (later tokens of a random-token prompt on a 135M model may tie and flip)
    lp_first, lp_again = first["meta_info"]["output_token_logprobs"][0], again["meta_info"]["output_token_logprobs"][0]
    print("first-token logprob recompute / host at 8 bits:", lp_first[:2], lp_again[:2])
    assert again["output_ids"][0] == first["output_ids"][0]
    assert abs(lp_again[0] - lp_first[0]) < 0.1  # measured here: 0.032 (-3.345 vs -3.377)


def test_a_full_host_pool_demotes_pages_to_the_floor(server):
    pages = _metric("sglang:kvtq_elastic_pages", bits="8") + _metric("sglang:kvtq_elastic_pages", bits="4")
    for seed in range(10, 10 + 16):  # far more than the host pool holds at the top
        _generate(_prompt(seed))
    demoted = _metric("sglang:kvtq_elastic_demotions_total", stream="v")
    assert demoted > 0 and _metric("sglang:kvtq_elastic_demotions_total", stream="k") > 0
    assert _metric("sglang:kvtq_elastic_pages", bits="4") > 0  # pages at the floor now
    assert _metric("sglang:kvtq_elastic_pages", bits="8") + _metric("sglang:kvtq_elastic_pages", bits="4") >= pages
