"""The device policy: why CUDA is missing, in words an operator can act on; when AMP pays."""

import pytest
import torch

from sae_pipeline.config import ModelConfig
from sae_pipeline.engine import device as dev
from sae_pipeline.engine.net import Architecture, build_net
from sae_pipeline.engine.trainer import ManualChain, _dense_chain
from sae_pipeline.errors import DeviceError

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_required_on_a_cpu_only_build_names_the_build(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(DeviceError, match=r"CPU-only build.*CUDA_VISIBLE_DEVICES unset, driver"):
        dev.resolve_device("cuda")


def test_cuda_required_with_every_gpu_hidden_names_the_variable(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES '-1' hides every GPU"):
        dev.resolve_device("cuda")


def test_cuda_required_with_a_driver_fault_gives_the_drivers_words(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")

    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(DeviceError, match=r"runtime cannot start: The NVIDIA driver .* too old"):
        dev.resolve_device("cuda")


def test_auto_and_cpu_fall_back_to_the_cpu(no_cuda):
    assert dev.resolve_device("auto") == dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.describe(torch.device("cpu")) == "cpu"


def _params(hidden):
    net = build_net(Architecture(64, list(hidden), output_activation="sigmoid"), seed=0)
    return list(net.parameters()), net


def test_amp_only_where_it_pays_on_cuda():
    small, _ = _params((256, 64, 10))
    wide, _ = _params((2048, 10))
    assert not dev.amp_pays(True, CUDA, small)  # launch-bound: fp32 and the fast path
    assert dev.amp_pays(True, CUDA, wide)
    assert not dev.amp_pays(False, CUDA, wide)
    assert not dev.amp_pays(True, torch.device("cpu"), wide)


def test_the_default_config_takes_the_fast_path_on_cuda():
    """amp=True is the default: on CUDA it kept the default 64-256-64-10 model off the fast
    path (ManualChain, FusedAdamStep) although all its operations run on the GPU."""
    params, net = _params((256, 64, 10))
    assert _dense_chain(net, [0, 1, 2]) is not None
    assert ManualChain.supported(ModelConfig(), dev.amp_pays(True, CUDA, params))
