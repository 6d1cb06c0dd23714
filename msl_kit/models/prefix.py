"""A backbone cut after one of its modules: a frozen prefix and the tail that trains.

The prefix ending at module `last` ("blocks.4") is every module registered before it along its
path (timm EfficientNet: conv_stem, bn1, blocks.0 ... blocks.4), `last` included. Its output is
read by a forward hook on `last` that stops the forward there (`prefix_output`), so any
backbone's own forward computes it. The tail is a shallow copy of the backbone whose prefix
modules are identities: the backbone's own forward then runs on prefix activations (functional
steps such as a final mean or dropout included) with the very parameters of the backbone.

That holds where the backbone's forward starts by running the prefix modules in that order and
feeds nothing else forward (a ViT's position embedding added after `patch_embed` breaks it):
`PrefixSplit.check` compares tail(prefix(x)) with backbone(x) once on a random input and
refuses a split that does not hold in one line. The frozen prefix runs in eval mode (BatchNorm
on its running statistics, no dropout) whatever the model's train / eval switch, so its
output is a fixed function of the image: what a cache can hold.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from msl_kit.errors import MslKitError


class PrefixError(MslKitError, ValueError):
    """A frozen prefix that cannot be cut where asked; the message names what can."""


class _Reached(Exception):
    """Raised by the hook on the prefix's last module, carrying its output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def _children_before(parent: nn.Module, child: str) -> list[str]:
    names = [n for n, _ in parent.named_children()]
    return names[: names.index(child)]


def prefix_names(backbone: nn.Module, last: str) -> list[str]:
    """The modules of the prefix that ends at `last`, outermost first; PrefixError naming the
    backbone's top-level modules when `last` is not one of its modules."""
    found = dict(backbone.named_modules())
    if not last or last not in found:
        top = ", ".join(n for n, _ in backbone.named_children())
        raise PrefixError(
            f"the backbone has no module {last!r} to end the frozen prefix at; name one of its "
            f"modules, e.g. one of {top} (or a child: 'blocks.4')"
        )
    parts, names = last.split("."), []
    for depth, part in enumerate(parts):
        path = ".".join(parts[:depth])
        parent = found[path] if path else backbone
        names += [f"{path}.{n}" if path else n for n in _children_before(parent, part)]
    return [*names, last]


def _parent_and_key(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, key = name.rpartition(".")
    return (root.get_submodule(path) if path else root), key


def _skip_prefix(backbone: nn.Module, names: list[str]) -> tuple[nn.Module, list[tuple]]:
    """A shallow copy of `backbone` with the modules `names` replaced by identities; the other
    modules (and their parameters) are the backbone's own. Also the (copy, original) pairs of
    the containers copied on the way, whose train / eval flags the copies must follow."""
    root = copy.copy(backbone)
    root._modules = dict(backbone._modules)
    pairs, copies = [(root, backbone)], {"": root}
    for name in names:
        path = name.rpartition(".")[0]
        parts = path.split(".") if path else []
        for depth in range(1, len(parts) + 1):  # copy each container on the way, once
            sub = ".".join(parts[:depth])
            if sub not in copies:
                parent = copies[".".join(parts[: depth - 1])]
                original = parent._modules[parts[depth - 1]]
                clone = copy.copy(original)
                clone._modules = dict(original._modules)
                parent._modules[parts[depth - 1]] = clone
                copies[sub] = clone
                pairs.append((clone, original))
        copies[path]._modules[name.rpartition(".")[2]] = nn.Identity()
    return root, pairs


class PrefixSplit:
    """`backbone` cut after module `last`: `prefix_output(images)` -> activations (eval mode, no
    gradient), `tail(activations)` -> the backbone's pooled features, trained parameters shared."""

    def __init__(self, backbone: nn.Module, last: str) -> None:
        self.backbone, self.last = backbone, last
        self.names = prefix_names(backbone, last)
        self._tail, self._pairs = _skip_prefix(backbone, self.names)
        self._frozen = False

    @property
    def modules(self) -> list[nn.Module]:
        """The prefix's modules, outermost first."""
        return [self.backbone.get_submodule(n) for n in self.names]

    def freeze(self) -> None:
        """No gradient for the prefix's parameters, and eval mode on every call of its modules
        (BatchNorm on running statistics, no dropout), whatever the model's switch says."""
        for module in self.modules:
            module.requires_grad_(False)
            if not self._frozen:
                module.register_forward_pre_hook(_to_eval)
        self._frozen = True

    @torch.no_grad()
    def prefix_output(self, images: torch.Tensor) -> torch.Tensor:
        """The output of module `last` for `images`, the prefix in eval mode, no gradient."""
        target = self.backbone.get_submodule(self.last)
        modes = [(m, m.training) for m in self.modules]
        for module, _ in modes:
            module.eval()

        def stop(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            raise _Reached(output)

        handle = target.register_forward_hook(stop)
        try:
            self.backbone(images)
        except _Reached as reached:
            return reached.output
        finally:
            handle.remove()
            for module, mode in modes:
                module.train(mode)
        raise PrefixError(f"the backbone's forward never ran module {self.last!r}")

    def tail(self, activations: torch.Tensor) -> torch.Tensor:
        """The backbone's forward from the prefix's output on: pooled features."""
        for clone, original in self._pairs:  # copied containers follow the train / eval switch
            clone.training = original.training
        return self._tail(activations)

    @torch.no_grad()
    def check(self, images: torch.Tensor, tol: float = 1e-4) -> None:
        """PrefixError unless tail(prefix(images)) equals backbone(images) in eval mode."""
        was = self.backbone.training
        self.backbone.eval()
        try:
            full = self.backbone(images)
            cut = self.tail(self.prefix_output(images))
        except (RuntimeError, ValueError, TypeError, IndexError):  # the cut broke the forward
            cut = None
        finally:
            self.backbone.train(was)
        same = cut is not None and full.shape == cut.shape
        same = same and bool(
            torch.allclose(cut, full, rtol=tol, atol=tol * float(full.abs().max()))
        )
        if not same:
            raise PrefixError(
                f"the backbone cannot be cut after {self.last!r}: its forward does more than run "
                f"the modules before it in order ({type(self.backbone).__name__} gives another "
                "output from the cut); pick an earlier module or train without a frozen prefix"
            )


def _to_eval(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.eval()
