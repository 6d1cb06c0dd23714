"""The loss registry: every loss a config can name (`loss.name`), in one table.

A new loss is one new file in this package plus one `LOSSES` line (or `register_loss` from
your own module, named in the config's `plugins`). Config validation, the recipe, the CLI's
choices and the notebooks' menus all read their choices from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from msl_kit.losses.gpw import (
    BinomialDevianceLoss,
    BinomialParams,
    ContrastiveLoss,
    ContrastiveParams,
    LiftedParams,
    LiftedStructureLoss,
    TripletLoss,
    TripletParams,
)
from msl_kit.losses.multi_similarity import MSParams, MultiSimilarityLoss
from msl_kit.losses.proxy_anchor import ProxyAnchorLoss, ProxyAnchorParams
from msl_kit.params import ParamError, ParamTypeError


@dataclass(frozen=True)
class LossSpec:
    """How a config builds a loss: its class, its declared parameters, how it is shown.

    `params` is a dataclass of `msl_kit.params.param` fields (names, types, defaults, ranges,
    one line of documentation each): they are the config's `loss.<name>.*` keys, checked
    against that declaration and passed to `cls` as keyword arguments. `mining` says the
    class takes `mining="ms" | "none"` (the run-level `loss.mining`, passed where set); `pairs`
    says it scores a similarity matrix (`from_sim(sim, labels, ref_labels=, ignore=)`), so it
    works with cross-batch memory and the GPW weight views. `needs_classes` says it learns one
    proxy per training class: the recipe passes `num_classes` (the train split's class count,
    labels 0..C-1) and `dim` (`model.embedding_dim`), and its parameters get their own
    optimizer group.
    """

    cls: type[nn.Module]
    title: str
    params: type | None = None
    mining: bool = False
    pairs: bool = True
    needs_classes: bool = False


LOSSES: dict[str, LossSpec] = {
    "ms": LossSpec(MultiSimilarityLoss, "Multi-Similarity", MSParams, mining=True),
    "contrastive": LossSpec(ContrastiveLoss, "Contrastive", ContrastiveParams, mining=True),
    "triplet": LossSpec(TripletLoss, "Triplet (semi-hard)", TripletParams),
    "binomial": LossSpec(BinomialDevianceLoss, "Binomial deviance", BinomialParams, mining=True),
    "lifted": LossSpec(LiftedStructureLoss, "Lifted structure", LiftedParams),
    "proxy_anchor": LossSpec(
        ProxyAnchorLoss, "Proxy-Anchor", ProxyAnchorParams, pairs=False, needs_classes=True
    ),
}


def register_loss(name: str, spec: LossSpec) -> None:
    """Add a loss under `name` (from a plugin module); an existing name is refused, and so is a
    name that cannot be a config section (`loss.<name>.<key>`) or params that are no dataclass."""
    if name in LOSSES and LOSSES[name] != spec:
        raise ParamError(f"a loss named {name!r} is already registered; pick another name")
    if not name.isidentifier():
        raise ParamError(f"a loss name must be a Python identifier (it names loss.{name}.*)")
    if spec.params is not None and not dataclasses.is_dataclass(spec.params):
        raise ParamError(f"loss {name!r}: LossSpec.params must be a dataclass of param fields")
    LOSSES[name] = spec


def loss_spec(name: str) -> LossSpec:
    """The registry entry of `name`; ParamError (a ValueError) naming the losses otherwise."""
    if name not in LOSSES:
        raise ParamError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_loss(name: str, **params: object) -> nn.Module:
    """The one loss builder: build_loss("ms", beta=50.0), build_loss("ms", mining="none"),
    build_loss("triplet", margin=0.2), build_loss("binomial", mining="ms"), ..."""
    spec = loss_spec(name)
    try:
        return spec.cls(**params)
    except ParamError:
        raise
    except TypeError as err:  # an argument the class does not take
        raise ParamTypeError(f"bad parameters for loss {name!r}: {err}") from None
