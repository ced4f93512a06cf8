"""The `moe-cluster` command line without a Ray cluster: --help shows the defaults, --json
output is JSON alone on stdout, a busy bench port is one line and exit status 2, every mistake
is one line `moe-cluster: error: ...` and status 2 before Ray starts (--debug adds the traceback),
and the banner's handle hint names the ingress method of each app."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import moe_cluster.serving.local as serving_local
import moe_cluster.serving.runner as serving_runner
from moe_cluster.cli import build_parser, main
from moe_cluster.serving.local import StartupInterrupted, StopSignals, handle_hint


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_help_shows_every_default(name, capsys):
    parser = subcommands()[name]
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            continue  # positionals, flags and options without a default say nothing
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        assert f"(default: {shown})" in help_text or "(default" in action.help, (name, action.dest)


def test_bench_help_names_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for expected in ("(default: tiny)", "(default: bench-results)", "(default: 1 64 1024 4096)", "(default: 32)",
                     "(default: 128)", "(default: 2.0)", "(default: 8765)"):
        assert expected in help_text


def test_bench_on_a_busy_port_is_one_line_and_status_2(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        status = main(["bench", "--port", str(port), "--out", str(tmp_path / "out")])
    assert status == 2
    assert time.monotonic() - started < 5  # checked before the bench measures anything or starts Ray
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port} on 127.0.0.1 is already in use" in err[0] and "--port" in err[0]
    assert not (tmp_path / "out").exists()


def test_bench_exits_1_when_an_answer_differs_from_the_oracle(tmp_path, capsys, monkeypatch):
    import moe_cluster.tools.bench as bench

    results = {"summary": {"handle_over_inprocess": 0.9}, "oracle_atol": 1e-5,
               "wrong_answers": ["handle T=64 layer=1: 3.00e-02"]}
    monkeypatch.setattr(bench, "run_bench", lambda settings, out, log: results)
    assert main(["bench", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == results["summary"]
    assert "handle T=64 layer=1: 3.00e-02" in err and "oracle" in err
    results["wrong_answers"] = []
    assert main(["bench", "--out", str(tmp_path)]) == 0


def test_generate_json_is_alone_on_stdout_in_process(tmp_path, capsys):
    hf_models = pytest.importorskip("tests.support.hf_models")
    hf_dir, moe_dir, hf_model = save_tiny_mixtral(tmp_path, hf_models)
    assert main(["generate", "--hf-model", str(hf_dir), "--checkpoint", str(moe_dir), "--input-ids", "1", "5", "9",
                 "--max-new-tokens", "3", "--in-process", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # nothing but the JSON
    assert result["output_ids"] == hf_generate(hf_model, [1, 5, 9], 3)
    assert result["timings"]["new_tokens"] == 3


def test_generate_json_sends_progress_to_stderr(tmp_path, capsys, monkeypatch):
    """Through the cluster (faked here; tests/cluster/test_cli_serve.py runs the real one): the
    progress lines and anything else printed meanwhile go to stderr, the JSON alone to stdout."""
    result = {"output_ids": [[1, 5, 9, 4]], "timings": {"new_tokens": 1}}

    def fake_generate_on_local_cluster(runner_args, input_ids, max_new_tokens, warmup, num_cpus, log):
        log("moe-cluster: starting a local Ray cluster for ...")
        print("(raylet) a message Ray prints on the driver's stdout")
        return result

    monkeypatch.setattr(serving_runner, "generate_on_local_cluster", fake_generate_on_local_cluster)
    hf, ckpt = fake_dirs(tmp_path)
    assert main(["generate", "--hf-model", str(hf), "--checkpoint", str(ckpt), "--input-ids", "1", "5",
                 "9", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == result
    assert "moe-cluster: starting a local Ray cluster" in err and "(raylet)" in err


def test_generate_without_json_prints_the_table(tmp_path, capsys):
    hf_models = pytest.importorskip("tests.support.hf_models")
    hf_dir, moe_dir, hf_model = save_tiny_mixtral(tmp_path, hf_models)
    assert main(["generate", "--hf-model", str(hf_dir), "--checkpoint", str(moe_dir), "--input-ids", "1", "5", "9",
                 "--max-new-tokens", "3", "--in-process", "--warmup", "0"]) == 0
    expected = hf_generate(hf_model, [1, 5, 9], 3)[0]
    assert f"output ids: 1 5 9 | {' '.join(map(str, expected[3:]))}" in capsys.readouterr().out


def save_tiny_mixtral(tmp_path, hf_models):
    """(hf_dir, moe checkpoint dir, hf_model) of the tests' tiny Mixtral."""
    from moe_cluster.hf.importer import import_hf_checkpoint

    hf_model = hf_models.build_hf("mixtral")
    hf_model.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "moe", log=lambda _: None)
    return tmp_path / "hf", tmp_path / "moe", hf_model


def hf_generate(hf_model, prompt: list[int], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor([prompt])
    return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False).tolist()


def test_serve_hf_model_flags_are_checked_before_ray_starts(tmp_path, capsys):
    assert main(["serve", "--in-process"]) == 2
    assert "need --hf-model" in capsys.readouterr().err
    hf, _ = fake_dirs(tmp_path)
    assert main(["serve", "--hf-model", str(hf)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def fake_dirs(tmp_path):
    """(a Hugging Face model directory, a moe-cluster checkpoint directory) as the CLI's path checks
    see them: only their config.json."""
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    for directory, config in ((hf, {"model_type": "mixtral"}), (ckpt, {"format": "moe-cluster/1", "model": {}})):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
    return hf, ckpt


def mistakes(tmp: str) -> dict[str, tuple[list[str], list[str]]]:
    """{name: (argv, what the one line must say)}; `tmp` holds fake_dirs' hf/ and ckpt/, a file `file`,
    a Hugging Face directory with a tokenizer
    `tok`, and the Serve configs bad.yaml, badargs.yaml and badport.yaml."""
    hf, ckpt, file = f"{tmp}/hf", f"{tmp}/ckpt", f"{tmp}/file"
    return {
        "checkpoint missing": (["serve", "--checkpoint", f"{tmp}/nope"], ["--checkpoint", "no such directory",
                                                                          "moe-cluster init"]),
        "checkpoint is HF": (["serve", "--checkpoint", hf], [
            "--checkpoint", "this is a Hugging Face model directory", f"`moe-cluster import-hf {hf} DST`",
            "pass DST"]),
        "checkpoint is a file": (["serve", "--checkpoint", file], ["--checkpoint", "is a file"]),
        "hf-model missing": (["serve", "--hf-model", f"{tmp}/nope", "--checkpoint", ckpt], ["--hf-model",
                                                                                           "no such directory"]),
        "hf-model is ours": (["serve", "--hf-model", ckpt, "--checkpoint", ckpt], ["--hf-model",
                                                                                  "is a moe-cluster checkpoint"]),
        "tokenizer missing": (["serve", "--hf-model", hf, "--checkpoint", ckpt, "--tokenizer", f"{tmp}/nope"],
                              ["--tokenizer", "no such directory"]),
        "config missing": (["serve", "--config", f"{tmp}/nope.yaml"], ["--config", "no such file"]),
        "config not YAML": (["serve", "--config", f"{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML"]),
        "config args invalid": (["serve", "--config", f"{tmp}/badargs.yaml"], [
            "badargs.yaml", "the args of app 'moe'", "bogus"]),
        "config port invalid": (["serve", "--config", f"{tmp}/badport.yaml"], ["http_options.port 99999", "badport.yaml", "1..65535"]),
        "port too large": (["serve", "--port", "99999"], ["--port", "99999", "1..65535"]),
        "port zero": (["serve", "--port", "0"], ["--port", "1..65535"]),
        "port not a number": (["serve", "--port", "http"], ["--port", "'http'", "1..65535"]),
        "unknown flag": (["serve", "--prot", "8100"], ["unrecognized arguments: --prot", "--help"]),
        "import SRC missing": (["import-hf", f"{tmp}/nope", f"{tmp}/out"], ["SRC", "no such directory",
                                                                           "config.json"]),
        "import SRC is ours": (["import-hf", ckpt, f"{tmp}/out"], ["SRC", "is a moe-cluster checkpoint"]),
        "import DST is a file": (["import-hf", hf, file], ["DST", "is a file"]),
        "generate hf-model missing": (["generate", "--hf-model", f"{tmp}/nope", "--checkpoint", ckpt,
                                       "--input-ids", "1"], ["--hf-model", "no such directory"]),
        "generate checkpoint is HF": (["generate", "--hf-model", hf, "--checkpoint", hf, "--input-ids", "1"],
                                      ["--checkpoint", "import-hf"]),
        "perplexity text missing": (["perplexity", "--hf-model", f"{tmp}/tok", "--text", f"{tmp}/nope.txt"],
                                    ["--text", "no such file"]),
        "perplexity without tokenizer": (["perplexity", "--hf-model", hf, "--text", file], [
            "--hf-model", "has no tokenizer"]),
        "perplexity checkpoint missing": (["perplexity", "--hf-model", f"{tmp}/tok", "--text", file,
                                           "--checkpoint", f"{tmp}/nope"], ["--checkpoint", "no such directory"]),
        "train out is a file": (["train", "--out", file], ["--out", "is a file"]),
        "init over a file": (["init", file], ["DIRECTORY", "is a file"]),
        "render-k8s folder missing": (["render-k8s", "--deployments", f"{tmp}/nope"], ["--deployments"]),
    }


@pytest.fixture
def mistake_dir(tmp_path):
    fake_dirs(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "bad.yaml").write_text("applications: [\n")
    app = "applications:\n- name: moe\n  import_path: moe_cluster.serving.app:build_app\n"
    (tmp_path / "badargs.yaml").write_text(app + "  args: {bogus: 1}\n")
    (tmp_path / "badport.yaml").write_text("http_options: {port: 99999}\n" + app)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    return tmp_path


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if `serve` gets as far as starting Ray."""
    def start_local_serve(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(serving_local, "start_local_serve", start_local_serve)


@pytest.mark.parametrize("name", sorted(mistakes("TMP")))
def test_each_mistake_is_one_line_and_status_2_before_ray_starts(name, mistake_dir, no_ray, capsys):
    argv, expected = mistakes(str(mistake_dir))[name]
    try:
        status = main(argv)
    except SystemExit as done:  # argparse's own mistakes (a bad --port, an unknown flag)
        status = done.code
    out, err = capsys.readouterr()
    assert status == 2, (status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-cluster: error: "), err
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in out + err


def test_debug_adds_the_traceback(tmp_path, capsys):
    for argv in (["--debug", "serve", "--checkpoint", str(tmp_path / "nope")],
                 ["serve", "--debug", "--checkpoint", str(tmp_path / "nope")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "UsageError" in err
        assert err.strip().splitlines()[-1].startswith("moe-cluster: error: --checkpoint")


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the errors that the user's input causes become one line; anything else is a bug."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving_local, "serve_local", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["serve"])


def test_a_wrong_hf_model_is_one_line_and_ray_never_starts(tmp_path):
    """The whole command as a user runs it: Ray writes its session under RAY_TMPDIR when it starts;
    nothing may be there (today's bug: Ray started, then a traceback 9 s later calling it SRC)."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    hf, ckpt = fake_dirs(tmp_path)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "moe_cluster.cli", "serve", "--hf-model", str(tmp_path / "nope"),
                           "--checkpoint", str(ckpt)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"moe-cluster: error: --hf-model {tmp_path / 'nope'}: no such directory; pass a Hugging Face model directory "
        "(config.json + *.safetensors, e.g. DIR/model of `moe-cluster train`)"]
    assert done.stdout == "" and "Started a local Ray instance" not in done.stderr
    assert os.listdir(ray_tmp) == [], "Ray was started"
    assert time.monotonic() - started < 60  # python and its imports only
    os.rmdir(ray_tmp)


@pytest.mark.parametrize("runner, method", [(False, "forward"), (True, "generate")])
def test_handle_hint_names_the_app_its_method_and_this_cluster(runner, method):
    hint = handle_hint("10.0.0.5:6379", "moe", runner, token_auth=False)
    assert 'ray.init(address="10.0.0.5:6379")' in hint and '"auto"' not in hint
    assert f'serve.get_app_handle("moe").{method}.remote(' in hint
    assert "RAY_AUTH_MODE=token" in handle_hint("10.0.0.5:6379", "moe", runner, token_auth=True)


def test_plan_serve_knows_the_ingress_without_starting_ray(no_ray):
    """The banner's method comes from the plan: a runner (`serve --hf-model`) answers `generate`."""
    class Whole:
        def build(self, moe_args):
            return "the runner app", "runner + router + experts"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    plan = serving_local.plan_serve(None, None, "127.0.0.1", port, Whole())
    assert plan.runner and plan.application == "the runner app" and plan.port == port
    assert not serving_local.plan_serve(None, None, "127.0.0.1", port).runner


def test_a_signal_is_noted_and_the_first_one_counts():
    """The handler raises nothing (raising inside Ray's Cython code failed with a SystemError); the
    start-up's own loop calls check(), which raises StartupInterrupted for the first signal."""
    signals = StopSignals()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signals.install()
        signals.check()  # no signal yet: nothing
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop.wait(5)
        os.kill(os.getpid(), signal.SIGINT)  # a second one: ignored
        time.sleep(0.1)
        with pytest.raises(StartupInterrupted) as caught:
            signals.check()
        assert caught.value.signum == signal.SIGTERM and str(caught.value) == "SIGTERM"
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_the_cli_knows_the_checkpoint_format_the_writer_writes():
    """cli_checks keeps its own copy of the format name (importing checkpoint/ pulls in torch before any
    check): the copy must not drift from checkpoint/format.py's."""
    from moe_cluster.checkpoint.format import FORMAT
    from moe_cluster.cli_checks import CHECKPOINT_FORMAT

    assert CHECKPOINT_FORMAT == FORMAT
