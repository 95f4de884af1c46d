"""A fake SGLang HTTP server for client tests (127.0.0.1, no GPU): page-granular prefix cache over token ids,
'host' hits for prefixes seen before, SSE streaming like /generate with --skip-tokenizer-init.

    python test/fake_sglang.py --port 30000 [ignored sglang args...]   # prints a host-pool log line like ours
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PS = 64


class FakeSGLang(BaseHTTPRequestHandler):
    """Page-granular prefix cache over token ids; 'host' hits for prefixes seen before, streamed SSE output."""

    seen: set[tuple[int, ...]] = set()
    lock = threading.Lock()
    prompts: list[int] = []
    flushed = 0

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/get_model_info":
            self._send(200, b'{"model_path": "fake"}')
        elif self.path == "/metrics":
            n = len(FakeSGLang.prompts)
            text = ("# HELP x\n"
                    f'sglang:cached_tokens_total{{cache_source="host",model_name="m"}} {n * 10}.0\n'
                    f'sglang:load_back_tokens_total{{model_name="m"}} {n * 64}.0\n'
                    'sglang:hicache_host_total_tokens{model_name="m"} 17408.0\n'
                    'sglang:unrelated_total 5.0\n')
            self._send(200, text.encode(), "text/plain")
        else:
            self._send(404, b"{}")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)) or 0)
        if self.path == "/flush_cache":
            with FakeSGLang.lock:
                FakeSGLang.seen.clear()
                FakeSGLang.flushed += 1
            self._send(200, b"")
            return
        req = json.loads(body)
        ids = req["input_ids"]
        n_out = req["sampling_params"]["max_new_tokens"]
        with FakeSGLang.lock:
            hit = 0
            for end in range(PS, len(ids) + 1, PS):
                if tuple(ids[:end]) in FakeSGLang.seen:
                    hit = end
            for end in range(PS, len(ids) + n_out + 1, PS):
                FakeSGLang.seen.add(tuple((ids + [7] * n_out)[:end]))
            FakeSGLang.prompts.append(len(ids))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k in range(1, n_out + 1):
            meta = {"completion_tokens": k, "cached_tokens": hit,
                    "cached_tokens_details": {"device": 0, "host": hit, "storage": 0, "storage_backend": "X"}}
            self.wfile.write(b"data: " + json.dumps({"output_ids": [7] * k, "meta_info": meta}).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")



def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 30000
    if "--enable-kvtuner-hicache" in argv:
        # the real pool's line format (test/sglang/test_host_pool.py parses a real one with the same regex)
        print("kvtuner_hicache kv host pool: 61760 tokens (965 pages), 16192 B/token (4.518 bits/element, "
              "3.54x vs bf16, K4cV4t-a-g64), 1.00 GB; a bf16 pool of these bytes holds 17438 tokens; "
              "codec=native; SGLang 0.5.23 (era E); L3 namespace kvtq2-x", flush=True)
    elif "--enable-hierarchical-cache" in argv:
        print("Allocating kv hierarchical KV host pool: 17408 tokens, 1.00 GB host memory.", flush=True)
    print("max_total_num_tokens=16384", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), FakeSGLang).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
