"""The scikit-learn estimator: contract, options and checkpoint resume."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from sae_pipeline import StackedAutoencoder
from sae_pipeline.config import ModelConfig
from sae_pipeline.engine import trainer
from sae_pipeline.errors import ConfigError

FAST = {"pretrain_epochs": 3, "finetune_epochs": 3, "random_state": 0}


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


@parametrize_with_checks([StackedAutoencoder(hidden_dims=(8, 3), **FAST)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_transform_inverse_score_and_layer_codes(digits):
    x, _ = digits
    sae = StackedAutoencoder(hidden_dims=(32, 16, 4), **FAST).fit(x[:500])
    codes = sae.transform(x[:50])
    assert codes.shape == (50, 4) and codes.dtype == np.float32
    assert sae.inverse_transform(codes).shape == (50, 64)
    np.testing.assert_allclose(sae.inverse_transform(codes), sae.reconstruct(x[:50]), atol=1e-6)
    errors = sae.reconstruction_error(x[:50])
    assert errors.shape == (50,) and (errors > 0).all()
    np.testing.assert_array_equal(sae.score_samples(x[:50]), -errors)  # higher = more normal
    layers = sae.get_layer_codes(x[:50])
    assert [h.shape[1] for h in layers] == [32, 16, 4]
    np.testing.assert_allclose(layers[-1], codes, atol=1e-6)
    assert list(sae.get_feature_names_out()) == ["code_0", "code_1", "code_2", "code_3"]


def test_pipeline_gridsearch_clone_and_pickle(digits):
    x, y = digits
    pipe = make_pipeline(
        MinMaxScaler(), StackedAutoencoder(hidden_dims=(16, 4), **FAST), LogisticRegression()
    )
    search = GridSearchCV(pipe, {"stackedautoencoder__hidden_dims": [(16, 4), (16, 8)]}, cv=2)
    search.fit(x[:300], y[:300])
    assert search.best_params_["stackedautoencoder__hidden_dims"] in [(16, 4), (16, 8)]
    sae = StackedAutoencoder(hidden_dims=(16, 4), **FAST).fit(x[:300])
    assert clone(sae).get_params() == sae.get_params()
    again = pickle.loads(pickle.dumps(sae))
    np.testing.assert_array_equal(again.transform(x[:20]), sae.transform(x[:20]))


def test_bad_hyperparameters_fail_with_the_name(digits):
    with pytest.raises(ConfigError, match=r"model\.activation"):
        StackedAutoencoder(activation="gelu").fit(digits[0][:50])
    with pytest.raises(ConfigError, match="noise_level is 0"):
        StackedAutoencoder(noise="masking", noise_level=0.0).fit(digits[0][:50])


def test_noise_is_applied_in_training_only(digits):
    x, _ = digits
    model = ModelConfig(noise="gaussian", noise_level=0.3)
    gen = torch.Generator().manual_seed(0)
    xt = torch.from_numpy(x[:10])
    assert not torch.equal(trainer.corrupt(xt, model, gen), xt)
    masked = trainer.corrupt(xt, ModelConfig(noise="masking", noise_level=0.5), gen)
    assert ((masked == 0) | (masked == xt)).all() and (masked == 0).sum() > (xt == 0).sum()
    noisy = StackedAutoencoder(hidden_dims=(16, 4), noise="gaussian", noise_level=0.3, **FAST)
    noisy.fit(x[:300])
    np.testing.assert_array_equal(noisy.transform(x[:20]), noisy.transform(x[:20]))
    clean = StackedAutoencoder(hidden_dims=(16, 4), noise="none", **FAST).fit(x[:300])
    assert not np.allclose(noisy.transform(x[:20]), clean.transform(x[:20]))


def test_tied_weights_share_storage(digits):
    sae = StackedAutoencoder(hidden_dims=(16, 4), tied_weights=True, **FAST).fit(digits[0][:200])
    net = sae.network
    assert len(net.decoders) == 0
    with torch.no_grad():
        net.encoders[0].weight.mul_(0)  # the decoder of layer 1 uses this very tensor
        h = torch.ones(1, 16)
        expected = torch.sigmoid(net.decoder_biases[0]).unsqueeze(0)
        torch.testing.assert_close(net.decode_layer(0, h), expected)
    untied = StackedAutoencoder(hidden_dims=(16, 4), **FAST).fit(digits[0][:200]).network
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(untied) - n_params(net) == 64 * 16 + 16 * 4


def test_sparsity_lowers_mean_activation(digits):
    x = digits[0][:600]
    base = dict(hidden_dims=(32,), code_activation="relu", pretrain_epochs=15, finetune_epochs=0)
    dense = StackedAutoencoder(**base, random_state=0).fit(x)
    sparse = StackedAutoencoder(**base, sparsity="l1", sparsity_weight=0.5, random_state=0)
    sparse.fit(x)
    assert sparse.transform(x).mean() < 0.7 * dense.transform(x).mean()
    kl = StackedAutoencoder(
        hidden_dims=(32,), code_activation="sigmoid", sparsity="kl", sparsity_weight=1.0,
        sparsity_target=0.05, pretrain_epochs=15, finetune_epochs=0, random_state=0,
    ).fit(x)  # fmt: skip
    sig = StackedAutoencoder(
        hidden_dims=(32,), code_activation="sigmoid", pretrain_epochs=15, finetune_epochs=0,
        random_state=0,
    ).fit(x)  # fmt: skip
    assert kl.transform(x).mean() < 0.7 * sig.transform(x).mean()


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "adamw", "weight_decay": 1e-4, "lr_schedule": "step"},
        {"optimizer": "sgd", "pretrain_learning_rate": 0.05, "finetune_learning_rate": 0.05},
        {"optimizer": "rmsprop"},
        {"activation": "tanh", "dropout": 0.2},
        {"activation": "leaky_relu", "batch_norm": True},
        {"activation": "sigmoid", "code_activation": "tanh"},
    ],
)
def test_options_train(digits, options):
    x = digits[0][:400]
    sae = StackedAutoencoder(hidden_dims=(16, 4), pretrain_epochs=4, finetune_epochs=6,
                             random_state=0, **options).fit(x)  # fmt: skip
    losses = sae.finetune_history_["val_loss"]
    assert losses[-1] < losses[0] or min(losses) < losses[0]
    assert np.isfinite(sae.transform(x)).all()


def test_supervised_finetuning_uses_labels(digits):
    x, y = digits
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    sae = StackedAutoencoder(
        hidden_dims=(32, 8), supervised=True, supervised_epochs=40, pretrain_epochs=5,
        finetune_epochs=5, random_state=0,
    ).fit(x_tr, y_tr)  # fmt: skip
    proba = sae.predict_proba(x_te)
    assert proba.shape == (len(x_te), 10)
    assert (sae.classes_[proba.argmax(1)] == y_te).mean() > 0.9
    assert not hasattr(StackedAutoencoder(), "predict_proba")


def test_default_code_units_are_all_alive(digits):
    sae = StackedAutoencoder(hidden_dims=(32, 8), pretrain_epochs=5, finetune_epochs=10,
                             random_state=0).fit(digits[0])  # fmt: skip
    assert (np.ptp(sae.transform(digits[0]), axis=0) > 1e-3).all()


def test_resumed_fit_equals_uninterrupted_fit(digits, tmp_path, monkeypatch):
    x = digits[0][:500]
    params = dict(hidden_dims=(16, 8, 4), pretrain_epochs=4, finetune_epochs=4, random_state=7)
    reference = StackedAutoencoder(**params, checkpoint_dir=str(tmp_path / "ref")).fit(x)

    real = trainer.pretrain_layer
    calls = []

    def killed_after_layer_1(net, k, *args, **kwargs):
        if k == 1:
            raise KeyboardInterrupt("worker killed")
        calls.append(k)
        return real(net, k, *args, **kwargs)

    monkeypatch.setattr(trainer, "pretrain_layer", killed_after_layer_1)
    ckpt = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        StackedAutoencoder(**params, checkpoint_dir=ckpt).fit(x)
    assert calls == [0] and (tmp_path / "run" / "layer_1.pt").exists()
    monkeypatch.setattr(trainer, "pretrain_layer", real)
    resumed = StackedAutoencoder(**params, checkpoint_dir=ckpt).fit(x)
    assert resumed.pretrain_history_[0] is None  # layer 1 came from its checkpoint
    np.testing.assert_array_equal(resumed.transform(x), reference.transform(x))


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fast-path", "autograd"])
def test_epoch_checkpoint_resumes_mid_phase(digits, tmp_path, dropout):
    x = torch.from_numpy(digits[0][:400])
    from sae_pipeline.config import PhaseConfig
    from sae_pipeline.engine.net import Architecture, build_net

    phase = PhaseConfig(epochs=8, patience=0)

    def run(ckpt=None, stop_at=None):
        net = build_net(Architecture(64, [16, 4], output_activation="sigmoid"), seed=1)

        def on_epoch(epoch, *_):
            if epoch == stop_at:
                raise KeyboardInterrupt

        hist = trainer.finetune(net, x, None, phase, ModelConfig(dropout=dropout), 3,
                                checkpoint=ckpt, checkpoint_every=2, on_epoch=on_epoch)  # fmt: skip
        return net, hist

    ref, ref_hist = run()
    ckpt = tmp_path / "ft.ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, stop_at=4)  # dies during epoch 5; the checkpoint holds epochs 1-4
    assert torch.load(ckpt, weights_only=True)["epoch"] == 4
    resumed, hist = run(ckpt)
    assert hist.val_loss == ref_hist.val_loss
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
