"""Notebook UI that redraws in place: pair-weight explorers and live training panels.

`PairWeightExplorer`: one batch's MS weights under alpha / beta / lambda / margin sliders.
`SnapshotExplorer`: the same batch's weights at each weight snapshot of a run.
`LiveCurves`, `LiveMining`: engine callbacks that redraw loss / recall curves and the mining
statistics while a run trains. The redraw logic is plain Python (`update`, `figure`) so tests
drive it without a browser; ipywidgets and IPython are imported only when a widget is shown.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from msl_kit.losses.mining import STAT_KEYS, ms_pair_weights
from msl_kit.losses.multi_similarity import PRESETS, MSParams, PairWeights
from msl_kit.params import declared
from msl_kit.train import recipe
from msl_kit.train.config import Config
from msl_kit.train.trainer import Callback
from msl_kit.viz import mining as viz_mining
from msl_kit.viz.common import new_figure, to_png

if TYPE_CHECKING:
    import ipywidgets
    from matplotlib.figure import Figure

# (min, max, step) of each MS slider, as MSParams declares them beside each number's range
SLIDERS = {name: meta.ui for name, (_, meta) in declared(MSParams).items()}
SLIDER_LABELS = {
    "alpha": "α (alpha)",
    "beta": "β (beta)",
    "lam": "λ (lambda)",
    "margin": "ε (margin)",
}
CUSTOM = "custom"


class PairWeightExplorer:
    """MS pair weights of one batch under sliders for alpha, beta, lambda, margin and a preset menu.

    `update(**params)` recomputes the weights and the MS figure and returns it; the widget's
    sliders call it on release. With `compare=True` a second figure below shows the same batch
    under the other GPW losses side by side (contrastive, triplet, binomial deviance, lifted
    structure at their defaults); it does not depend on the sliders, so it is drawn once.
    """

    def __init__(
        self,
        sim: Tensor,
        labels: Tensor,
        *,
        preset: str = "released",
        compare: bool = True,
        dpi: int = 80,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        self.sim, self.labels = sim.detach().float().cpu(), torch.as_tensor(labels).cpu()
        self.ms = MSParams.preset(preset)
        self.compare, self.dpi = compare, dpi
        self.weights: PairWeights | None = None
        self.figure: Figure | None = None
        self.compare_figure: Figure | None = None
        self.renders = 0
        self._ui: dict[str, Any] = {}
        self._syncing = False
        if compare:
            others = {n: {} for n in viz_mining.other_pair_losses()}
            self.compare_figure = viz_mining.gpw_figure(self.sim, self.labels, others)
        self.update()

    @property
    def params(self) -> dict[str, float]:
        """The four numbers the sliders hold, by name."""
        return dataclasses.asdict(self.ms)

    @property
    def preset(self) -> str:
        """The preset whose values the sliders hold, or "custom"."""
        return next(
            (
                n
                for n, p in PRESETS.items()
                if all(abs(self.params[k] - v) < 1e-9 for k, v in p.items())
            ),
            CUSTOM,
        )

    def update(self, **params: float) -> Figure:
        """Set any of alpha, beta, lam, margin; recompute the weights and redraw. Returns the MS
        figure."""
        unknown = sorted(set(params) - set(SLIDERS))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown}; the explorer takes {sorted(SLIDERS)}"
            )
        self.ms = dataclasses.replace(self.ms, **params)  # checked against MSParams
        # computed once per move: the figure draws these very weights
        self.weights = ms_pair_weights(self.sim, self.labels, self.ms)
        self.figure = viz_mining.pair_weight_figure(
            self.sim, self.labels, self.ms, weights=self.weights
        )
        self.renders += 1
        if self._ui:
            self._sync_controls()
            self._ui["image"].value = to_png(self.figure, self.dpi)
        return self.figure

    def apply_preset(self, name: str) -> Figure:
        """Set all four parameters from PRESETS[name] in one redraw."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return self.update(**PRESETS[name])

    def _sync_controls(self) -> None:
        # moving the controls to the current state must not trigger another redraw
        self._syncing = True
        try:
            for name, slider in self._ui["sliders"].items():
                slider.value = self.params[name]
            self._ui["preset"].value = self.preset
        finally:
            self._syncing = False

    def widget(self) -> ipywidgets.VBox:
        """The sliders, preset menu and figures as one ipywidgets box (built once)."""
        import ipywidgets as w

        if "box" in self._ui:
            return self._ui["box"]
        sliders = {
            n: w.FloatSlider(
                value=self.params[n],
                min=lo,
                max=hi,
                step=step,
                description=SLIDER_LABELS[n],
                continuous_update=False,
                readout_format=".2f",
                style={"description_width": "80px"},
                layout=w.Layout(width="360px"),
            )
            for n, (lo, hi, step) in SLIDERS.items()
        }
        preset = w.Dropdown(options=[*PRESETS, CUSTOM], value=self.preset, description="preset")
        for name, slider in sliders.items():
            slider.add_class(f"msl-slider-{name}")
            slider.observe(
                lambda change, n=name: self._syncing or self.update(**{n: change["new"]}), "value"
            )
        preset.observe(
            lambda change: (
                self._syncing or change["new"] == CUSTOM or self.apply_preset(change["new"])
            ),
            "value",
        )
        image = w.Image(value=to_png(self.figure, self.dpi), format="png")
        image.add_class("msl-pair-weights")
        row1, row2 = list(sliders.values())[:1], list(sliders.values())[1:]
        parts = [w.HBox([preset, *row1]), w.HBox(row2), image]
        self._ui = {"sliders": sliders, "preset": preset, "image": image}
        if self.compare:
            self._ui["compare"] = w.Image(value=to_png(self.compare_figure, self.dpi), format="png")
            self._ui["compare"].add_class("msl-gpw-compare")
            parts.append(self._ui["compare"])
        self._ui["box"] = w.VBox(parts)
        self._ui["box"].add_class("msl-explorer")
        return self._ui["box"]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget())


def pair_weight_explorer(
    sim: Tensor, labels: Tensor, *, preset: str = "released", compare: bool = True
) -> PairWeightExplorer:
    """An explorer of one batch's MS pair weights; display it (last line of a cell) for the
    sliders."""
    return PairWeightExplorer(sim, labels, preset=preset, compare=compare)


class SnapshotExplorer:
    """One batch's MS pair weights at each weight snapshot of a run, under a slider over the
    snapshot iterations: how the same pairs looked to the model as it learned.

    `sims` maps iteration -> the batch's (B, B) similarities under that snapshot
    (`explore.snapshot_similarities`); the MS numbers `ms` stay fixed (the run's own,
    `explore.ms_params`). `update(iteration)` recomputes the weights once and redraws; the
    slider calls it.
    """

    def __init__(
        self,
        sims: Mapping[int, Tensor],
        labels: Tensor,
        ms: MSParams | None = None,
        *,
        dpi: int = 80,
    ) -> None:
        if not sims:
            raise ValueError("no snapshot to show: the run folder has no snapshots/iter_*.pt")
        self.sims = {int(i): s.detach().float().cpu() for i, s in sorted(sims.items())}
        self.labels = torch.as_tensor(labels).cpu()
        self.ms = ms or MSParams()
        lo = min(float(s.min()) for s in self.sims.values())
        self.sim_range = (min(lo, self.ms.lam) - 0.05, 1.02)  # one axis for every snapshot
        self.dpi, self.renders, self._ui = dpi, 0, {}
        self.iteration = self.iterations[-1]
        self.weights: PairWeights | None = None
        self.figure: Figure | None = None
        self.update(self.iteration)

    @property
    def iterations(self) -> list[int]:
        """The snapshot iterations, in training order."""
        return list(self.sims)

    def update(self, iteration: int) -> Figure:
        """Show the snapshot of `iteration`: its weights (computed once) and the MS figure."""
        if int(iteration) not in self.sims:
            raise ValueError(f"no snapshot at iteration {iteration}; the run has {self.iterations}")
        self.iteration = int(iteration)
        sim = self.sims[self.iteration]
        self.weights = ms_pair_weights(sim, self.labels, self.ms)
        self.figure = viz_mining.pair_weight_figure(
            sim,
            self.labels,
            self.ms,
            weights=self.weights,
            title=f"iteration {self.iteration}",
            sim_range=self.sim_range,
        )
        self.renders += 1
        if self._ui:
            self._ui["image"].value = to_png(self.figure, self.dpi)
        return self.figure

    def widget(self) -> ipywidgets.VBox:
        """The iteration slider over the figure, as one ipywidgets box (built once)."""
        import ipywidgets as w

        if "box" in self._ui:
            return self._ui["box"]
        slider = w.SelectionSlider(
            options=self.iterations,
            value=self.iteration,
            description="iteration",
            continuous_update=False,
            layout=w.Layout(width="480px"),
        )
        slider.add_class("msl-snapshot-slider")
        slider.observe(lambda change: self.update(change["new"]), "value")
        image = w.Image(value=to_png(self.figure, self.dpi), format="png")
        image.add_class("msl-snapshot-weights")
        self._ui = {"slider": slider, "image": image, "box": w.VBox([slider, image])}
        return self._ui["box"]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget())


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class _LivePanel(Callback):
    """A figure that redraws in place in one notebook output while a run trains.

    Outside a notebook (or with `display=False`) it only records; `figure()` always works.
    Subclasses record in the hooks and call `_due()`; redraws happen at most every
    `min_interval` seconds, and always at the end.
    """

    def __init__(self, *, min_interval: float = 2.0, display: bool | None = None) -> None:
        self.min_interval = min_interval
        self.display = _in_notebook() if display is None else display
        self.total, self.draws, self._handle, self._last = 0, 0, None, 0.0

    def figure(self) -> Figure:
        raise NotImplementedError

    def on_start(self, cfg: Config, start_iteration: int, total: int) -> None:
        self.total, self._last = total, time.monotonic()
        if self.display:
            from IPython.display import display

            self._handle = display(self._image(), display_id=True)

    def on_end(self, results: dict) -> None:
        self.redraw()

    def _due(self) -> None:
        if time.monotonic() - self._last >= self.min_interval:
            self.redraw()

    def _image(self) -> Any:
        from IPython.display import Image

        return Image(to_png(self.figure()))

    def redraw(self) -> None:
        """Replace the notebook output with the current figure (no-op outside notebooks)."""
        self._last = time.monotonic()
        if self.display and self._handle is not None:
            self._handle.update(self._image())
            self.draws += 1


class LiveCurves(_LivePanel):
    """Engine callback: loss and recall curves, redrawn in place in a notebook (on each
    evaluation, at the end, and at most every `min_interval` seconds in between)."""

    def __init__(
        self,
        metric_keys: Sequence[str] = ("recall@1", "map@r"),
        *,
        min_interval: float = 2.0,
        display: bool | None = None,
    ) -> None:
        super().__init__(min_interval=min_interval, display=display)
        self.metric_keys = tuple(metric_keys)
        self.steps: list[tuple[int, float]] = []
        self.evals: list[tuple[int, dict]] = []

    def on_step(self, record: dict) -> None:
        self.steps.append((int(record["iteration"]), float(record["loss"])))
        self._due()

    def on_eval(self, iteration: int, results: dict) -> None:
        self.evals.append((int(iteration), dict(results)))
        self.redraw()

    def figure(self) -> Figure:
        """Loss per iteration (left) and the evaluation metrics in % (right)."""
        fig = new_figure(10, 3.2)
        ax_loss, ax_eval = fig.subplots(1, 2)
        xlim = (0, max(self.total, 1))
        if self.steps:
            ax_loss.plot(*zip(*self.steps), lw=1, color="#444444")
        ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss", xlim=xlim)
        for key in self.metric_keys:
            points = [(i, 100 * r[key]) for i, r in self.evals if key in r]
            if points:
                ax_eval.plot(*zip(*points), marker="o", label=key)
        ax_eval.set(xlabel="iteration", ylabel="%", title="evaluation", xlim=xlim)
        if ax_eval.lines:
            ax_eval.legend(fontsize=8)
        return fig


class LiveMining(_LivePanel):
    """Engine callback: what MS is looking at as it learns, redrawn in place in a notebook.

    Keeps the mining statistics of the records the engine passes to `on_step` every
    `train.log_every` iterations (STAT_KEYS) and draws
    `viz_mining.mining_dynamics` of them, with the run's λ.
    """

    def __init__(self, *, min_interval: float = 2.0, display: bool | None = None) -> None:
        super().__init__(min_interval=min_interval, display=display)
        self.records: list[dict] = []
        self.lam: float | None = None

    def on_start(self, cfg: Config, start_iteration: int, total: int) -> None:
        self.lam = recipe.ms_params(cfg).lam if isinstance(cfg, Config) else None
        super().on_start(cfg, start_iteration, total)

    def on_step(self, record: dict) -> None:
        if STAT_KEYS[0] in record:
            keys = ("iteration", *STAT_KEYS)
            self.records.append({k: record.get(k) for k in keys})
            self._due()

    def figure(self) -> Figure:
        """`viz_mining.mining_dynamics` of the records so far, or a note while there are none."""
        if self.records:
            return viz_mining.mining_dynamics(self.records, lam=self.lam, total=self.total or None)
        fig = new_figure(13, 1.2)
        fig.text(
            0.5,
            0.5,
            "mining statistics appear every train.log_every iterations",
            ha="center",
            va="center",
        )
        return fig
