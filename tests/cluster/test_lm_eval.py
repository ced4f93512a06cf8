"""lm-evaluation-harness against a served model: the served numbers are the in-process numbers.

`moe-cluster serve --hf-model DIR --checkpoint CKPT` (a real process, bearer auth on) serves a tiny
Mixtral with a byte-level BPE tokenizer: runner + router + one expert deployment holding the 4 experts.
The harness (pinned in the `eval` extra) runs two tasks on data the test writes (tests/support/
lm_eval_tasks.py: a perplexity task, `loglikelihood_rolling`, and a 4-way multiple choice) twice:

- `local-completions` against the server: token-id prompts (tokenized_requests=True) in batches of 4,
  `echo` + `logprobs`, the tokenizer found on the server (/tokenizer_info, /tokenize: no model files);
- `hf`: transformers' model on the same weights, in the harness' own process.

Every metric agrees within 1e-4 relative, and the token perplexity is what `moe-cluster perplexity`
prints for the same text. Everything runs offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, local data) and
talks to 127.0.0.1 only. The tokenizer endpoints are also checked over HTTP, with lm_eval's own client.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.engine.text import chat_prompt

from ..support.hf_models import build_hf
from ..support.lm_eval_tasks import DOCUMENTS, MC_TASK, PPL_TASK, write_tasks
from ..support.tokenizers_zoo import byte_level_bpe
from .conftest import free_port, stop_process, wait_until

pytest.importorskip("lm_eval", reason="needs the `eval` extra: pip install -e '.[eval]' (the `test` extra has it)")

TOKEN, TOKEN_ENV, MODEL = "lm-eval-test-token-5e1c", "MOE_TEST_LM_EVAL_TOKEN", "tiny-mixtral"
RTOL = 1e-4
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """The model (HF directory + its MoE checkpoint), its tokenizer and the harness' task directory."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = byte_level_bpe()  # EOS <|endoftext|> (id 0): the harness' prefix token for perplexity
    hf_model = build_hf("mixtral", vocab_size=len(tokenizer))
    hf_model.save_pretrained(root / MODEL)
    tokenizer.save_pretrained(str(root / MODEL))
    import_hf_checkpoint(root / MODEL, root / "moe", log=lambda _: None)
    return {"root": root, "model_dir": root / MODEL, "checkpoint": root / "moe", "tokenizer": tokenizer,
            "tasks": write_tasks(root / "tasks", root / MODEL)}


@pytest.fixture(scope="module")
def server(work):
    root = work["root"]
    args = {"torch_threads": 1, "auth_token_env": TOKEN_ENV, "placement": [{"name": "experts", "experts": [0, 1, 2, 3]}]}
    (root / "serve.yaml").write_text(yaml.safe_dump({"applications": [
        {"name": "moe", "route_prefix": "/", "import_path": "moe_cluster.serving.app:build_app", "args": args}]}))
    port, log_path = free_port(), root / "serve.log"
    with open(log_path, "w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "moe_cluster.cli", "serve", "--hf-model",
                                    str(work["model_dir"]), "--checkpoint", str(work["checkpoint"]), "--config",
                                    str(root / "serve.yaml"), "--port", str(port), "--num-cpus", "2"],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, TOKEN_ENV: TOKEN})
    try:
        wait_until(lambda: "moe-cluster: ready in" in log_path.read_text() or process.poll() is not None,
                   timeout=240, what="the ready banner of moe-cluster serve --hf-model")
        assert process.poll() is None, log_path.read_text()[-3000:]
        yield {"url": f"http://127.0.0.1:{port}", "log": log_path}
    finally:
        stop_process(process)


def call(server, path: str, payload: dict | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    """(status, JSON answer) of a GET (no payload) or POST to the server."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(server["url"] + path, data, headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- the tokenizer endpoints over HTTP ------------------------------------------------------------------------

def test_tokenize_and_detokenize_are_the_served_tokenizers(server, work):
    tokenizer, text = work["tokenizer"], DOCUMENTS[1]
    status, answer = call(server, "/tokenize", {"model": MODEL, "prompt": text})
    assert status == 200 and answer["tokens"] == tokenizer(text)["input_ids"] and answer["count"] == len(
        answer["tokens"])
    assert answer["max_model_len"] == 4096 + 256  # the runner's max_input_tokens + max_new_tokens
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    assert call(server, "/tokenize", {"messages": messages})[1]["tokens"] == chat_prompt(tokenizer, messages)
    assert call(server, "/detokenize", {"tokens": answer["tokens"]}) == (200, {"prompt": text})


@pytest.mark.parametrize("path, payload, status, param", [
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
])
def test_tokenizer_mistakes_are_openai_error_objects(server, path, payload, status, param):
    got, answer = call(server, path, payload)
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param


def test_the_tokenizer_endpoints_need_the_token(server):
    for path, payload in [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}), ("/tokenizer_info", None)]:
        status, answer = call(server, path, payload, token=None)
        assert status == 401 and answer["error"]["type"] == "authentication_error"


def test_lm_evals_remote_tokenizer_finds_and_uses_the_servers(server, work):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    base = server["url"] + "/v1/completions"
    assert check_remote_tokenizer_support(base, auth_token=TOKEN)
    assert not check_remote_tokenizer_support(base, max_retries=1)  # 401 without the token
    remote, local = RemoteTokenizer(base, auth_token=TOKEN), work["tokenizer"]
    assert (remote.eos_token, remote.eos_token_id) == (local.eos_token, local.eos_token_id)
    for text in DOCUMENTS:
        ids = remote.encode(text)
        assert ids == local(text, add_special_tokens=False)["input_ids"] and remote.decode(ids) == text


# --- the harness ----------------------------------------------------------------------------------------------

def lm_eval(work, name: str, model: str, model_args: str, *flags: str) -> dict:
    """One run of `lm_eval run`, offline: {"results": {task: {metric: value}}, "samples": {task: [per doc]}}."""
    out = work["root"] / f"out-{name}"
    command = [str(Path(sys.executable).with_name("lm_eval")), "run", "--model", model, "--model_args", model_args,
               "--tasks", f"{PPL_TASK},{MC_TASK}", "--include_path", str(work["tasks"]), "--output_path", str(out),
               "--log_samples", "--seed", "0", *flags]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(work["root"] / "hf-home"), "OPENAI_API_KEY": TOKEN}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    (found,) = out.rglob("results_*.json")
    samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in (PPL_TASK, MC_TASK)}
    return {"results": json.loads(found.read_text())["results"], "samples": samples}


@pytest.fixture(scope="module")
def in_process(work) -> dict:
    """lm_eval's `hf` model: transformers on the same weights, fp32, in the harness' process."""
    return lm_eval(work, "hf", "hf", f"pretrained={work['model_dir']},dtype=float32", "--device", "cpu",
                   "--batch_size", "1")


def test_the_harness_token_perplexity_is_the_perplexity_command(work, in_process):
    """A document's token perplexity in the harness is what `moe-cluster perplexity` prints for the document
    as one window that starts with EOS (its MoE blocks here in process, from the imported checkpoint)."""
    path = work["root"] / "doc0.txt"
    path.write_text(work["tokenizer"].eos_token + DOCUMENTS[0])
    done = subprocess.run([sys.executable, "-m", "moe_cluster.cli", "perplexity", "--hf-model", str(work["model_dir"]),
                           "--checkpoint", str(work["checkpoint"]), "--in-process", "--text", str(path),
                           "--context-length", "1024", "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    loglikelihood, tokens = in_process["samples"][PPL_TASK][0]["token_perplexity"]
    assert answer["tokens"] == tokens == len(work["tokenizer"](DOCUMENTS[0])["input_ids"])
    assert answer["perplexity"] == pytest.approx(math.exp(-loglikelihood / tokens), rel=RTOL)


def test_served_metrics_equal_the_in_process_ones(server, work, in_process):
    base = server["url"] + "/v1/completions"
    served = lm_eval(work, "served", "local-completions",
                     f"model={MODEL},base_url={base},tokenizer_backend=remote,auth_token={TOKEN},"
                     "tokenized_requests=True,num_concurrent=1,max_retries=1,timeout=120", "--batch_size", "4")
    print(json.dumps({"served": served["results"], "in_process": in_process["results"]}, indent=1))
    for task in (PPL_TASK, MC_TASK):  # each document's log-likelihoods first: a mismatch names the document
        for doc, (got, want) in enumerate(zip(scores(served, task), scores(in_process, task), strict=True)):
            assert [greedy for _, greedy in got] == [greedy for _, greedy in want], (task, doc, got, want)
            assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=RTOL), (task, doc, got, want)
    for task in (PPL_TASK, MC_TASK):
        expected = metrics(in_process["results"][task])
        assert metrics(served["results"][task]).keys() == expected.keys()
        for name, value in expected.items():
            wanted = value if isinstance(value, str) else pytest.approx(value, rel=RTOL)  # a stderr may be "N/A"
            assert served["results"][task][name] == wanted, (task, name)


def scores(run: dict, task: str) -> list[list[tuple[float, str]]]:
    """Per document, in order, its (log-likelihood, is_greedy) as the harness logged them: one per choice for
    a multiple choice; is_greedy "" for a perplexity document (logged ["-110.7"] or [["-19.2", "False"], ...])."""
    per_doc = []
    for sample in sorted(run["samples"][task], key=lambda s: s["doc_id"]):
        pairs = [resp if isinstance(resp, list) else [resp, ""] for resp in sample["filtered_resps"]]
        per_doc.append([(float(loglikelihood), greedy) for loglikelihood, greedy in pairs])
    return per_doc


def metrics(results: dict) -> dict:
    """The task's metrics ("acc,none": 0.5, "acc_stderr,none": 0.28, ...) without its name and labels."""
    return {k: v for k, v in results.items() if "," in k}
