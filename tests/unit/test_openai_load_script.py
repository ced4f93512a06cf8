"""scripts/openai_load.py against a fake OpenAI completions server on loopback (no model): its table and
JSON without the long-prompt flags, and with them the long prompts it sends while the streams run."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "openai_load.py"
HEADER = f"{'C':>3} {'requests':>8} {'TTFT ms (mean/p50/p90)':>24} {'TPOT ms (mean/p50/p90)':>24} {'output tok/s':>12}"


class _FakeCompletions(BaseHTTPRequestHandler):
    """POST /v1/completions: streamed, one chunk per token (max_tokens of them, 5 ms apart) and a usage chunk;
    not streamed, one answer after 50 ms. Every request body is kept in server.bodies."""

    protocol_version = "HTTP/1.0"

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
        base = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}
        if not body.get("stream"):
            time.sleep(0.05)
            answer = json.dumps({**base, "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                                                      "logprobs": None}],
                                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1,
                                           "total_tokens": len(body["prompt"]) + 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        tokens = body["max_tokens"]
        for i in range(tokens):
            time.sleep(0.005)
            chunk = {**base, "choices": [{"index": 0, "text": "x", "logprobs": None,
                                          "finish_reason": "length" if i == tokens - 1 else None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {**base, "choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": tokens,
                                                  "total_tokens": len(body["prompt"]) + tokens}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


class _Server:
    def __enter__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
        self.server.daemon_threads = True
        self.server.bodies, self.server.lock = [], threading.Lock()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _run(url: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), "--url", url, "--model", "fake", "--concurrency", "2",
                           "--requests-per-client", "3", "--prompt-tokens", "5", "--max-tokens", "6",
                           "--json", str(out), *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_without_long_prompts_the_table_and_json_are_the_streams_only(tmp_path):
    with _Server() as server:
        done = _run(server.url, tmp_path / "out.json")
    assert done.stdout.splitlines()[0] == HEADER  # the table of before the flags existed
    (level,) = json.loads((tmp_path / "out.json").read_text())
    assert "long_prompts" not in level
    assert level["requests"] == 6 and level["output_tokens"] == 36
    assert len(server.server.bodies) == 2 * (3 + 1)  # + a warm-up each
    assert all(b["stream"] and len(b["prompt"]) == 5 and b["max_tokens"] == 6 for b in server.server.bodies)


def test_long_prompts_keep_arriving_while_the_streams_run_and_are_counted(tmp_path):
    with _Server() as server:
        done = _run(server.url, tmp_path / "out.json", "--long-prompt-tokens", "40", "--long-clients", "2")
    assert done.stdout.splitlines()[0].startswith(HEADER) and "long served" in done.stdout.splitlines()[0]
    (level,) = json.loads((tmp_path / "out.json").read_text())
    streams = [b for b in server.server.bodies if b.get("stream")]
    longs = [b for b in server.server.bodies if not b.get("stream")]
    assert level["requests"] == 6 and len(streams) == 8 and all(len(b["prompt"]) == 5 for b in streams)
    assert longs and all(len(b["prompt"]) == 40 and b["max_tokens"] == 1 for b in longs)
    long = level["long_prompts"]
    assert long["tokens"] == 40 and long["clients"] == 2 and long["failed"] == 0
    # the streams take >= 3 x 6 x 5 ms each, a long prompt 50 ms: the two clients are answered during the run,
    # and the prompt each had in flight when the streams ended is answered but not counted
    assert 1 <= long["served"] <= len(longs) - 2 and long["latency_ms"]["mean"] >= 50
    # the streams' prompts are those of a run without long prompts (the long ones have draws of their own)
    with _Server() as again:
        _run(again.url, tmp_path / "plain.json")
    assert sorted(b["prompt"] for b in again.server.bodies) == sorted(b["prompt"] for b in streams)
