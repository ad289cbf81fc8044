"""The stacked autoencoder as a plain ``nn.Module``.

Layer k has an encoder ``dims[k] -> dims[k+1]`` and a decoder ``dims[k+1] -> dims[k]``. The
full encoder applies encoders 0..L-1; the full decoder applies decoders L-1..0. Decoder k>0
reconstructs the hidden code of layer k-1, so it ends in the hidden activation; decoder 0
reconstructs the input and ends in the output activation. That makes a layer's
pretraining autoencoder exactly the pair of modules the stack later fine-tunes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


@dataclass
class Architecture:
    """Everything needed to rebuild the network (saved with every checkpoint)."""

    input_dim: int
    hidden_dims: list[int]
    activation: str = "relu"
    code_activation: str = "linear"
    output_activation: str = "sigmoid"
    dropout: float = 0.0
    batch_norm: bool = False
    tied_weights: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> list[int]:
        return [self.input_dim, *self.hidden_dims]

    @property
    def n_layers(self) -> int:
        return len(self.hidden_dims)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StackedAutoencoderNet(nn.Module):
    """Encoders and decoders of every layer; see the module docstring for the wiring."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        dims = arch.dims
        self.encoders = nn.ModuleList(nn.Linear(dims[k], dims[k + 1]) for k in range(arch.n_layers))
        if arch.tied_weights:
            # Tied: decoder k uses encoder k's weight transposed; only its bias is its own.
            self.decoders = nn.ModuleList()
            self.decoder_biases = nn.ParameterList(
                nn.Parameter(torch.zeros(dims[k])) for k in range(arch.n_layers)
            )
        else:
            self.decoders = nn.ModuleList(
                nn.Linear(dims[k + 1], dims[k]) for k in range(arch.n_layers)
            )
            self.decoder_biases = nn.ParameterList()
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(dims[k + 1]) if arch.batch_norm else nn.Identity()
            for k in range(arch.n_layers)
        )

    # ---- one layer -------------------------------------------------------------------------
    def encoder_activation(self, k: int) -> str:
        return self.arch.code_activation if k == self.arch.n_layers - 1 else self.arch.activation

    def decoder_activation(self, k: int) -> str:
        return self.arch.output_activation if k == 0 else self.arch.activation

    def encode_layer(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """(batch, dims[k]) -> (batch, dims[k+1])."""
        h = _ACTIVATIONS[self.encoder_activation(k)](self.norms[k](self.encoders[k](x)))
        if self.arch.dropout > 0 and k < self.arch.n_layers - 1:
            h = F.dropout(h, self.arch.dropout, self.training)
        return h

    def decode_layer(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """(batch, dims[k+1]) -> (batch, dims[k])."""
        if self.arch.tied_weights:
            z = F.linear(h, self.encoders[k].weight.t(), self.decoder_biases[k])
        else:
            z = self.decoders[k](h)
        return _ACTIVATIONS[self.decoder_activation(k)](z)

    def layer_parameters(self, k: int) -> list[nn.Parameter]:
        """Parameters trained when layer k is pretrained."""
        params = [*self.encoders[k].parameters(), *self.norms[k].parameters()]
        if self.arch.tied_weights:
            params.append(self.decoder_biases[k])
        else:
            params.extend(self.decoders[k].parameters())
        return params

    # ---- the stack -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Codes after ``upto`` layers (default: all): (batch, input_dim) -> (batch, code)."""
        for k in range(self.arch.n_layers if upto is None else upto):
            x = self.encode_layer(k, x)
        return x

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        for k in reversed(range(self.arch.n_layers)):
            h = self.decode_layer(k, h)
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(x)
        return self.decode(code), code


def build_net(
    arch: Architecture | dict[str, Any], seed: int | None = None
) -> StackedAutoencoderNet:
    """A new network; with ``seed`` its initial weights are reproducible."""
    if isinstance(arch, dict):
        arch = Architecture(**arch)
    if seed is None:
        return StackedAutoencoderNet(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StackedAutoencoderNet(arch)


def net_blob(net: StackedAutoencoderNet) -> dict[str, Any]:
    """Architecture and weights together: all ``load_net`` needs to rebuild the model."""
    return {"arch": net.arch.to_dict(), "state_dict": net.state_dict()}


def save_net(net: StackedAutoencoderNet, path: Any, **extra: Any) -> None:
    """Save architecture and weights together, so the file alone rebuilds the model."""
    torch.save({**net_blob(net), **extra}, path)


def load_net(path_or_blob: Any, map_location: str = "cpu") -> StackedAutoencoderNet:
    blob = (
        path_or_blob
        if isinstance(path_or_blob, dict)
        else torch.load(path_or_blob, map_location=map_location, weights_only=True)
    )
    net = StackedAutoencoderNet(Architecture(**blob["arch"]))
    net.load_state_dict(blob["state_dict"])
    return net.eval()
