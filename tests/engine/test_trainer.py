import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sae_pipeline.config import ModelConfig, PhaseConfig
from sae_pipeline.engine import trainer
from sae_pipeline.engine.net import Architecture, build_net

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te = train_test_split(x, test_size=0.25, random_state=0, stratify=y)
    return x_tr[:-200], x_tr[-200:], x_te


def _net(hidden=(32, 8), seed=0):
    return build_net(Architecture(64, list(hidden), output_activation="sigmoid"), seed=seed)


def test_pretraining_layer_k_leaves_lower_layers_unchanged(digits):
    x_tr, _x_val, _ = digits
    net = _net((32, 16, 8))
    phase = PhaseConfig(epochs=2, patience=0)
    trainer.pretrain_layer(net, 0, trainer.as_tensor(x_tr, CPU), None, phase, ModelConfig(), 0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer.pretrain_layer(net, 1, trainer.as_tensor(x_tr, CPU), None, phase, ModelConfig(), 1)
    after = net.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith(("encoders.1.", "decoders.1.")), name


def test_finetuning_beats_pretraining_alone_on_digits(digits):
    x_tr, x_val, x_te = digits
    net = _net()
    t_tr, t_val = trainer.as_tensor(x_tr, CPU), trainer.as_tensor(x_val, CPU)
    for k in range(2):
        trainer.pretrain_layer(
            net, k, t_tr, t_val, PhaseConfig(epochs=15, learning_rate=3e-3), ModelConfig(), k
        )
    pre = np.mean((trainer.reconstruct_array(net, x_te) - x_te) ** 2)
    trainer.finetune(net, t_tr, t_val, PhaseConfig(epochs=30), ModelConfig(), 9)
    post = np.mean((trainer.reconstruct_array(net, x_te) - x_te) ** 2)
    assert post < 0.9 * pre, (pre, post)


def test_training_is_deterministic_on_cpu(digits):
    x_tr, x_val, _ = digits
    codes = []
    for _ in range(2):
        net = _net(seed=3)
        t_tr = trainer.as_tensor(x_tr, CPU)
        trainer.pretrain_layer(net, 0, t_tr, None, PhaseConfig(epochs=2), ModelConfig(), 5)
        trainer.finetune(net, t_tr, None, PhaseConfig(epochs=2), ModelConfig(), 6)
        codes.append(trainer.encode_array(net, x_val))
    np.testing.assert_array_equal(codes[0], codes[1])


def test_early_stopping_restores_the_best_epoch(digits):
    x_tr, x_val, _ = digits
    net = _net()
    # 300 rows and a high learning rate: validation loss stalls and bounces within 40 epochs.
    t_tr, t_val = trainer.as_tensor(x_tr[:300], CPU), trainer.as_tensor(x_val, CPU)
    phase = PhaseConfig(epochs=40, learning_rate=0.03, patience=3)
    hist = trainer.finetune(net, t_tr, t_val, phase, ModelConfig(), 0)
    assert len(hist.val_loss) < 40  # it stopped early
    assert hist.best_epoch == int(np.argmin(hist.val_loss))
    assert hist.best_epoch < len(hist.val_loss) - 1  # the last epoch was worse
    assert trainer.mean_loss(net, t_val) == pytest.approx(min(hist.val_loss), rel=1e-5)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("sparsity", ["none", "l1"])
def test_fast_path_gradients_equal_autograd(activation, sparsity):
    model = ModelConfig(sparsity=sparsity, sparsity_weight=0.1 if sparsity == "l1" else 0.0)
    net = build_net(Architecture(12, [8, 3], activation=activation), seed=0)
    x = torch.rand(5, 12)
    layers, code_index = trainer._dense_chain(net, [0, 1])
    loss = trainer.ManualChain(layers, 5, code_index, model).step(x, x)
    manual = [p.grad.clone() for layer in layers for p in layer[:2]]
    net.zero_grad(set_to_none=True)
    recon, code = net(x)
    reference = torch.nn.functional.mse_loss(recon, x)
    (reference + trainer.sparsity_penalty(code, model)).backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, (w, _b, _) in zip(manual[::2], layers, strict=True):
        torch.testing.assert_close(got, w.grad)
    for got, (_w, b, _) in zip(manual[1::2], layers, strict=True):
        torch.testing.assert_close(got, b.grad)


def test_fast_path_and_autograd_train_the_same_model(digits):
    x_tr, x_val, _ = digits
    nets = []
    for fast in (True, False):
        net = _net(seed=2)
        t_tr = trainer.as_tensor(x_tr, CPU)

        def forward(h, net=net):
            code = net.encode_layer(0, h)
            return net.decode_layer(0, code), code

        trainer.train_phase(
            net, forward, net.layer_parameters(0), t_tr, None, PhaseConfig(epochs=2),
            ModelConfig(), 0, chain=trainer._dense_chain(net, [0]), fast=fast,
        )  # fmt: skip
        nets.append(trainer.encode_array(net, x_val))
    np.testing.assert_allclose(nets[0], nets[1], rtol=1e-4, atol=1e-5)
