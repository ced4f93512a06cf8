"""Weights identified by content: the writer records each file's sha256 in config.json, the reader
checks the files it opens against them, and the app (ResolvedApp) is identified by them, not by the
checkpoint's path."""

import json

import pytest

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.checkpoint import (CheckpointChanged, expert_file, load_config, load_digests, load_experts,
                                    load_model, load_router_layers, save_model)
from moe_cluster.checkpoint.format import config_file, file_digest, router_file, weight_files

CONFIG = ModelConfig(d_model=8, d_ff=12, num_experts=3, top_k=2, num_layers=2)
NAMES = ["experts/expert-00000.safetensors", "experts/expert-00001.safetensors",
         "experts/expert-00002.safetensors", "router.safetensors"]


def _write(directory, seed):
    save_model(MoEModel.random(CONFIG, seed=seed), directory)
    return directory


def _forget_digests(directory):
    """The checkpoint as written before digests were recorded: config.json without "files"."""
    data = json.loads(config_file(directory).read_text())
    del data["files"]
    config_file(directory).write_text(json.dumps(data))


def test_the_writer_records_the_sha256_of_every_file(tmp_path):
    _write(tmp_path, seed=0)
    recorded = json.loads(config_file(tmp_path).read_text())["files"]
    assert sorted(recorded) == NAMES
    for path in weight_files(tmp_path, CONFIG.num_experts):
        assert recorded[path.relative_to(tmp_path).as_posix()] == file_digest(path)
    assert load_digests(tmp_path) == recorded


def test_digests_of_a_checkpoint_without_them_are_computed(tmp_path):
    recorded = load_digests(_write(tmp_path, seed=0))
    _forget_digests(tmp_path)
    assert load_digests(tmp_path) == recorded
    load_model(tmp_path)  # an old checkpoint still loads


def test_file_digest_streams_in_chunks(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 1000)
    assert file_digest(path, chunk_bytes=1000) == file_digest(path)


@pytest.mark.parametrize("which", ["router", "expert"])
def test_a_tampered_file_is_refused_naming_the_file_and_both_digests(tmp_path, which):
    _write(tmp_path, seed=0)
    digests = load_digests(tmp_path)
    path = router_file(tmp_path) if which == "router" else expert_file(tmp_path, 1)
    expected = digests[path.relative_to(tmp_path).as_posix()]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointChanged) as info:
        load_model(tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value) and file_digest(path) in str(info.value)
    with pytest.raises(CheckpointChanged, match="refusing to mix"):  # a replica, given the app's digests
        if which == "router":
            load_router_layers(tmp_path, CONFIG, digests)
        else:
            load_experts(tmp_path, CONFIG, [1], digests=digests)
    load_experts(tmp_path, CONFIG, [0, 2], digests=digests)  # files it does not open are not read


def test_a_checkpoint_rewritten_in_place_is_refused_by_the_apps_replicas(tmp_path):
    """The app is built; then another model is written into its directory: a replica started now
    (a replacement, a scale-up) refuses to load, the router's gates and every expert alike."""
    from moe_cluster.serving.args import resolve_app
    from moe_cluster.serving.cluster_moe import load_gates_and_shared
    from moe_cluster.serving.expert import _build_experts

    app = resolve_app({"checkpoint": str(_write(tmp_path / "ckpt", seed=0))})
    pairs = [(layer, 2) for layer in CONFIG.moe_layer_ids]
    assert set(_build_experts(app.args, app.config, pairs, dict(app.digests))) == set(pairs)
    _write(tmp_path / "ckpt", seed=1)  # e.g. `moe-cluster import-hf --force` into the served directory
    with pytest.raises(CheckpointChanged, match="expert-00002.safetensors has sha256"):
        _build_experts(app.args, app.config, pairs, dict(app.digests))
    with pytest.raises(CheckpointChanged, match="router.safetensors has sha256"):
        load_gates_and_shared(app)
    expert_file(tmp_path / "ckpt", 2).unlink()  # half-way through a rewrite
    with pytest.raises(CheckpointChanged, match="expert-00002.safetensors is missing"):
        _build_experts(app.args, app.config, pairs, dict(app.digests))


def test_the_app_fingerprint_is_the_weights_not_the_path(tmp_path):
    from moe_cluster.serving.args import resolve_app

    def fingerprint(directory):
        return resolve_app({"checkpoint": str(directory)}).fingerprint

    same = fingerprint(_write(tmp_path / "a", seed=0))
    assert fingerprint(_write(tmp_path / "b", seed=0)) == same  # the same weights elsewhere
    assert fingerprint(_write(tmp_path / "a", seed=1)) != same  # other weights at the same path
    _forget_digests(tmp_path / "b")
    assert fingerprint(tmp_path / "b") == same  # digests computed when the app is built
    assert load_config(tmp_path / "b") == CONFIG
