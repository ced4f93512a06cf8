"""The `moe-cluster` command line without a Ray cluster: --help shows the defaults, --json
output is JSON alone on stdout, a busy bench port is one line and exit status 2."""

import argparse
import json
import socket
import time

import pytest
import torch

import moe_cluster.serving.runner as serving_runner
from moe_cluster.cli import build_parser, main


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
    assert main(["generate", "--hf-model", str(tmp_path), "--checkpoint", str(tmp_path), "--input-ids", "1", "5",
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


def test_serve_hf_model_flags_are_checked_before_ray_starts(capsys):
    assert main(["serve", "--in-process"]) == 2
    assert "need --hf-model" in capsys.readouterr().err
    assert main(["serve", "--hf-model", "some-dir"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
