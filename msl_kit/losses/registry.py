"""The loss registry: every loss a config can name (`loss.name`), in one table.

A new loss is one new file in this package plus one `LOSSES` line (or `register_loss` from
your own module, named in the config's `plugins`). Config validation, the recipe, the CLI's
choices and the notebooks' menus all read their choices from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from msl_kit.losses.gpw import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    LiftedStructureLoss,
    TripletLoss,
)
from msl_kit.losses.multi_similarity import MultiSimilarityLoss
from msl_kit.losses.proxy_anchor import ProxyAnchorLoss


@dataclass(frozen=True)
class LossSpec:
    """How a config builds a loss: its class, which `loss.*` keys it takes, how it is shown.

    `keys` are passed as keyword arguments from the config's loss section; `mining` says the
    class takes `mining="ms" | "none"` (passed where `loss.mining` is set); `pairs` says it
    scores a similarity matrix (`from_sim(sim, labels, ref_labels=, ignore=)`), so it works
    with cross-batch memory and the GPW weight views. `needs_classes` says it learns one
    proxy per training class: the recipe passes `num_classes` (the train split's class count,
    labels 0..C-1) and `dim` (`model.embedding_dim`), and its parameters get their own
    optimizer group. `defaults` are the loss's own values of shared `loss.*` keys (Proxy-Anchor's
    alpha is 32, MS's 2): a config fills them in wherever no key or preset sets them.
    """

    cls: type[nn.Module]
    title: str
    keys: tuple[str, ...] = ()
    mining: bool = False
    pairs: bool = True
    needs_classes: bool = False
    defaults: dict[str, float] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {
    "ms": LossSpec(
        MultiSimilarityLoss, "Multi-Similarity", ("alpha", "beta", "lam", "margin"), mining=True
    ),
    "contrastive": LossSpec(ContrastiveLoss, "Contrastive", mining=True),
    "triplet": LossSpec(TripletLoss, "Triplet (semi-hard)", ("margin",)),
    "binomial": LossSpec(BinomialDevianceLoss, "Binomial deviance", mining=True),
    "lifted": LossSpec(LiftedStructureLoss, "Lifted structure"),
    "proxy_anchor": LossSpec(
        ProxyAnchorLoss,
        "Proxy-Anchor",
        ("margin", "alpha"),
        pairs=False,
        needs_classes=True,
        defaults={"alpha": 32.0, "margin": 0.1},  # the paper's scale and margin
    ),
}


def register_loss(name: str, spec: LossSpec) -> None:
    """Add a loss under `name` (from a plugin module); an existing name is refused."""
    if name in LOSSES and LOSSES[name] != spec:
        raise ValueError(f"a loss named {name!r} is already registered; pick another name")
    LOSSES[name] = spec


def loss_spec(name: str) -> LossSpec:
    """The registry entry of `name`; ValueError naming the registered losses otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_loss(name: str, **params: object) -> nn.Module:
    """The one loss builder: build_loss("ms", beta=50.0), build_loss("ms", mining="none"),
    build_loss("triplet", margin=0.2), build_loss("binomial", mining="ms"), ..."""
    spec = loss_spec(name)
    try:
        return spec.cls(**params)
    except TypeError as err:
        raise TypeError(f"bad parameters for loss {name!r}: {err}") from None
