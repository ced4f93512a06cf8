"""runtime.pick_device, the one device choice of every replica (expert, router, runner): CUDA only
when Ray gave the actor a GPU AND CUDA works in it; fake GPUs (ray.init(num_gpus=N) without CUDA)
and CUDA without a GPU of its own both stay on the CPU."""

import pytest
import ray
import torch

from moe_cluster.serving.runtime import pick_device


@pytest.mark.parametrize("gpu_ids, cuda, expected", [
    (["0"], True, "cuda"),
    ([], True, "cpu"),  # a replica without num_gpus on a GPU machine: the GPU belongs to others
    (["0"], False, "cpu"),  # a fake GPU
    ([], False, "cpu"),
])
def test_cuda_only_with_a_gpu_from_ray_and_cuda(monkeypatch, gpu_ids, cuda, expected):
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert pick_device() == torch.device(expected)
