"""``StackedAutoencoder``: the SAE engine as a scikit-learn estimator.

    from sae_pipeline import StackedAutoencoder
    sae = StackedAutoencoder(hidden_dims=(256, 64, 10), random_state=0).fit(X)
    codes = sae.transform(X)            # (n, 10)
    errors = sae.reconstruction_error(X)  # per-row reconstruction error (higher = stranger)

``fit`` runs greedy layer-wise pretraining, then end-to-end fine-tuning, and (with
``supervised=True`` and labels) a final phase that trains the encoder with a classifier head.
It follows scikit-learn's contract, so it works in ``Pipeline``, ``GridSearchCV`` and ``clone``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from sae_pipeline.config import ModelConfig, PhaseConfig, build_config
from sae_pipeline.engine import trainer
from sae_pipeline.engine.net import Architecture, StackedAutoencoderNet, build_net


class StackedAutoencoder(TransformerMixin, BaseEstimator):
    """Stacked autoencoder: greedy layer-wise pretraining, then end-to-end fine-tuning.

    Parameters mirror the pipeline config (``model``, ``training.pretrain``,
    ``training.finetune``); invalid values fail in ``fit`` with the parameter's name.
    ``output_activation='auto'`` picks sigmoid when the training data lies in [0, 1].
    """

    def __init__(
        self,
        hidden_dims: tuple[int, ...] = (256, 64, 10),
        *,
        activation: str = "relu",
        code_activation: str = "linear",
        output_activation: str = "auto",
        dropout: float = 0.0,
        batch_norm: bool = False,
        tied_weights: bool = False,
        noise: str = "gaussian",
        noise_level: float = 0.2,
        sparsity: str = "none",
        sparsity_weight: float = 0.0,
        sparsity_target: float = 0.05,
        optimizer: str = "adam",
        batch_size: int = 64,
        weight_decay: float = 0.0,
        pretrain_epochs: int = 40,
        pretrain_learning_rate: float = 3e-3,
        finetune_epochs: int = 400,
        finetune_learning_rate: float = 2e-3,
        lr_schedule: str = "cosine",
        patience: int = 0,
        validation_fraction: float = 0.1,
        supervised: bool = False,
        supervised_epochs: int = 50,
        supervised_weight: float = 1.0,
        device: str = "auto",
        amp: bool = True,
        checkpoint_dir: str | None = None,
        random_state: int | None = None,
    ):
        self.hidden_dims = hidden_dims
        self.activation = activation
        self.code_activation = code_activation
        self.output_activation = output_activation
        self.dropout = dropout
        self.batch_norm = batch_norm
        self.tied_weights = tied_weights
        self.noise = noise
        self.noise_level = noise_level
        self.sparsity = sparsity
        self.sparsity_weight = sparsity_weight
        self.sparsity_target = sparsity_target
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.pretrain_epochs = pretrain_epochs
        self.pretrain_learning_rate = pretrain_learning_rate
        self.finetune_epochs = finetune_epochs
        self.finetune_learning_rate = finetune_learning_rate
        self.lr_schedule = lr_schedule
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.supervised = supervised
        self.supervised_epochs = supervised_epochs
        self.supervised_weight = supervised_weight
        self.device = device
        self.amp = amp
        self.checkpoint_dir = checkpoint_dir
        self.random_state = random_state

    # ---- configuration -------------------------------------------------------------------------
    def _settings(self) -> tuple[ModelConfig, PhaseConfig, PhaseConfig]:
        """Validate the hyperparameters through the pipeline's typed config (one place)."""
        phase = {
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "weight_decay": self.weight_decay,
            "lr_schedule": self.lr_schedule,
            "patience": self.patience,
        }
        cfg = build_config(
            {
                "model": {
                    "hidden_dims": list(self.hidden_dims),
                    "activation": self.activation,
                    "code_activation": self.code_activation,
                    "dropout": self.dropout,
                    "batch_norm": self.batch_norm,
                    "tied_weights": self.tied_weights,
                    "noise": self.noise,
                    "noise_level": self.noise_level,
                    "sparsity": self.sparsity,
                    "sparsity_weight": self.sparsity_weight,
                    "sparsity_target": self.sparsity_target,
                },
                "training": {
                    "pretrain": {
                        **phase,
                        "epochs": self.pretrain_epochs,
                        "learning_rate": self.pretrain_learning_rate,
                    },
                    "finetune": {
                        **phase,
                        "epochs": self.finetune_epochs,
                        "learning_rate": self.finetune_learning_rate,
                    },
                },
            }
        )
        return cfg.model, cfg.training.pretrain, cfg.training.finetune

    def _seed(self) -> int:
        if self.random_state is None:
            return int(np.random.randint(0, 2**31 - 1))
        if isinstance(self.random_state, np.random.RandomState):
            return int(self.random_state.randint(0, 2**31 - 1))
        return int(self.random_state)

    # ---- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Pretrain every layer greedily, fine-tune the stack; with ``supervised``, use ``y``."""
        X = validate_data(self, X, dtype=np.float32, ensure_min_samples=2)
        model_cfg, pre, fine = self._settings()
        seed = self._seed()
        out_act = self.output_activation
        if out_act == "auto":
            out_act = "sigmoid" if X.min() >= 0.0 and X.max() <= 1.0 else "linear"
        arch = Architecture(
            input_dim=X.shape[1],
            hidden_dims=list(self.hidden_dims),
            activation=model_cfg.activation,
            code_activation=model_cfg.code_activation,
            output_activation=out_act,
            dropout=model_cfg.dropout,
            batch_norm=model_cfg.batch_norm,
            tied_weights=model_cfg.tied_weights,
        )
        device = trainer.resolve_device(self.device)
        x_train, x_val, y_train = self._split(X, y, seed)
        t_train = trainer.as_tensor(x_train, device)
        t_val = trainer.as_tensor(x_val, device) if x_val is not None else None
        ckpt = Path(self.checkpoint_dir) if self.checkpoint_dir else None
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)

        net = build_net(arch, seed=seed).to(device)
        self.pretrain_history_ = []
        for k in range(arch.n_layers):
            done = ckpt / f"layer_{k + 1}.pt" if ckpt else None
            if done is not None and done.exists():  # a resumed fit skips finished layers
                net.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
                self.pretrain_history_.append(None)
                continue
            hist = trainer.pretrain_layer(
                net, k, t_train, t_val, pre, model_cfg, seed + k + 1, amp=self.amp,
                checkpoint=ckpt / f"layer_{k + 1}.ckpt" if ckpt else None,
            )  # fmt: skip
            self.pretrain_history_.append(hist.to_dict())
            if done is not None:
                torch.save(net.state_dict(), done)
        self.pretrained_state_ = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        hist = trainer.finetune(
            net, t_train, t_val, fine, model_cfg, seed + 1000, amp=self.amp,
            checkpoint=ckpt / "finetune.ckpt" if ckpt else None,
        )  # fmt: skip
        self.finetune_history_ = hist.to_dict()
        if self.supervised and y is not None:
            self._supervised_finetune(net, t_train, y_train, fine, model_cfg, seed + 2000)
        self.net_ = net.cpu().eval()
        self.n_components_ = arch.hidden_dims[-1]
        return self

    def _split(self, X, y, seed):
        """Hold out ``validation_fraction`` for early stopping and loss curves."""
        n = len(X)
        n_val = round(self.validation_fraction * n) if self.validation_fraction else 0
        y_arr = None if y is None else np.asarray(y)
        if n_val < 2 or n - n_val < 2:
            return X, None, y_arr
        perm = np.random.default_rng(seed).permutation(n)
        tr, va = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        return X[tr], X[va], None if y_arr is None else y_arr[tr]

    def _supervised_finetune(self, net, x, y, phase, model_cfg, seed):
        """Encoder plus a linear classifier head, trained on cross-entropy + reconstruction."""
        classes, y_idx = np.unique(y, return_inverse=True)
        self.classes_ = classes
        device = x.device
        torch.manual_seed(seed)
        head = torch.nn.Linear(net.arch.hidden_dims[-1], len(classes)).to(device)
        target = torch.as_tensor(y_idx, device=device)
        opt = trainer.make_optimizer(list(net.parameters()) + list(head.parameters()), phase)
        gen = torch.Generator(device=device).manual_seed(seed)
        bs = min(phase.batch_size, len(x))
        net.train()
        for _ in range(self.supervised_epochs):
            perm = torch.randperm(len(x), generator=gen, device=device)
            for i in range(0, len(x) - bs + 1, bs):
                idx = perm[i : i + bs]
                recon, code = net(trainer.corrupt(x[idx], model_cfg, gen))
                loss = F.mse_loss(recon, x[idx])
                loss = loss + self.supervised_weight * F.cross_entropy(head(code), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        self.head_ = head.cpu().eval()

    # ---- using it ------------------------------------------------------------------------------
    def _x(self, X) -> np.ndarray:
        check_is_fitted(self, "net_")
        return validate_data(self, X, dtype=np.float32, reset=False)

    def transform(self, X) -> np.ndarray:
        """Codes of the last layer: (n_samples, hidden_dims[-1])."""
        return trainer.encode_array(self.net_, self._x(X))

    def inverse_transform(self, X) -> np.ndarray:
        """Decode codes back to the input space."""
        check_is_fitted(self, "net_")
        codes = np.asarray(X, dtype=np.float32)
        if codes.ndim != 2 or codes.shape[1] != self.n_components_:
            raise ValueError(
                f"inverse_transform expects codes of shape (n, {self.n_components_}), "
                f"got {codes.shape}"
            )
        with torch.no_grad():
            return self.net_.decode(torch.from_numpy(np.ascontiguousarray(codes))).numpy()

    def reconstruct(self, X) -> np.ndarray:
        return trainer.reconstruct_array(self.net_, self._x(X))

    def reconstruction_error(self, X) -> np.ndarray:
        """Per-row mean squared reconstruction error (higher = stranger)."""
        x = self._x(X)
        return np.mean((trainer.reconstruct_array(self.net_, x) - x) ** 2, axis=1)

    def score_samples(self, X) -> np.ndarray:
        """Normality per row, scikit-learn's outlier convention (higher = more normal): the
        negated reconstruction error. ``SAEAnomalyDetector`` is the tuned anomaly detector."""
        return -self.reconstruction_error(X)

    def get_layer_codes(self, X) -> list[np.ndarray]:
        """Every layer's features: [h1 (n, d1), h2 (n, d2), ..., code (n, dL)]."""
        x = torch.from_numpy(self._x(X))
        out, h = [], x
        with torch.no_grad():
            for k in range(self.net_.arch.n_layers):
                h = self.net_.encode_layer(k, h)
                out.append(h.numpy().copy())
        return out

    @available_if(lambda self: self.supervised)
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities from the supervised head (``supervised=True`` fits only)."""
        check_is_fitted(self, "head_")
        with torch.no_grad():
            codes = torch.from_numpy(self.transform(X))
            return torch.softmax(self.head_(codes), dim=1).numpy()

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "net_")
        return np.asarray([f"code_{i}" for i in range(self.n_components_)], dtype=object)

    @property
    def network(self) -> StackedAutoencoderNet:
        check_is_fitted(self, "net_")
        return self.net_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.transformer_tags.preserves_dtype = ["float32"]  # the network computes in float32
        return tags
