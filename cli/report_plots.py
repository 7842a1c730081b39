"""The report's plots: curves, task groups and accuracy matrices of each run; comparisons of the runs.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so plotting needs no display
and leaves a user's pyplot state (backend, open figures) alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedevents.federated.continual import accuracy_matrix

from fedevents.handlers.atomic import write_atomic
from .report import MAP_METRIC, ExperimentReport, Report, Scores

__all__ = ["plot_report"]

#: Above this many clients the curves draw them in one colour under one legend entry.
LEGEND_CLIENTS = 10
#: At most this many per-client matrices in one grid; the title says how many were left out.
GRID_CLIENTS = 16
#: Lines with at most this many points mark each point.
MARKED_POINTS = 30
#: A heatmap with at most this many cells has its values written in.
ANNOTATE_CELLS = 120
DPI = 120

_NAMES = {"val_acc": "val accuracy", "val_loss": "val loss", "tr_acc": "train accuracy", "tr_loss": "train loss",
          MAP_METRIC: "mAP"}


#: Every figure is written in each of these formats; the first is the one report.md shows.
FORMATS = ("png", "pdf")


def plot_report(report: Report, out_dir: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the report's figures in each of ``formats``; give the paths in the first format.

    Per run: ``<label>-curves``, ``<label>-matrix`` and, with more than one task, ``<label>-task-groups``.
    For several runs: ``comparison`` (a panel per metric), ``forgetting`` (bars), and ``seeds`` where runs
    differ only in their random seed (their mean with a band of one standard deviation).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Figure]] = []
    for exp in report.experiments:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", exp.label)
        figures += [(f"{stem}-curves", _curves(exp)), (f"{stem}-matrix", _matrix(exp))]
        if max((len(c.tasks) for c in exp.clients), default=0) > 1:
            figures.append((f"{stem}-task-groups", _task_groups(exp)))
    if len(report.experiments) > 1:
        figures += [("comparison", _comparison(report.experiments)), ("forgetting", _forgetting(report.experiments))]
        groups = _seed_groups(report.experiments)
        if groups:
            figures.append(("seeds", _seeds(groups)))
    written = []
    for name, fig in figures:
        paths = [_save(fig, out / f"{name}.{fmt}", fmt) for fmt in formats]
        written.append(paths[0])
    return written


def metric_name(metric: str | None) -> str:
    """A metric's name for an axis: ``val_rank_1`` is rank-1, ``val_map`` is mAP."""
    if metric is None:
        return "no metric"
    rank = re.fullmatch(r"val_rank_(\d+)", metric)
    return f"rank-{rank.group(1)}" if rank else _NAMES.get(metric, metric)


# --- the figures -------------------------------------------------------------------------------------------


def _curves(exp: ExperimentReport) -> Figure:
    panels = [(exp.metric, [c.scores for c in exp.clients])]
    if exp.metric != MAP_METRIC and any(c.maps for c in exp.clients):
        panels.append((MAP_METRIC, [c.maps for c in exp.clients]))
    fig = _figure(6.0 * len(panels) + 1.8, 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    crowd = len(exp.clients) > LEGEND_CLIENTS
    for ax, (metric, per_client) in zip(axes, panels):
        _client_lines(ax, [c.name for c in exp.clients], per_client, crowd)
        _mean_line(ax, per_client, "mean over clients", color="black", linewidth=2.8, marker="o", zorder=3)
        _label_score_axes(ax, metric_name(metric), per_client, metric)
        if metric is not None:
            ax.set_title(metric_name(metric))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        _legend_outside(axes[-1], handles, labels, "client")
    fig.suptitle(f"{exp.label}: validation per client ({exp.method or 'method n/a'}, {exp.status or 'status n/a'})")
    return fig


def _matrix(exp: ExperimentReport) -> Figure:
    panels = _matrix_panels(exp)
    if not panels:
        fig = _figure(6.0, 3.0)
        _no_scores(fig.subplots(), exp.metric)
        fig.suptitle(f"{exp.label}: accuracy matrix")
        return fig
    n_rounds = max(len(rounds) for _, rounds, _, _ in panels)
    n_tasks = max(len(tasks) for _, _, tasks, _ in panels)
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width = max(2.6, 1.1 + 0.75 * n_tasks)
    # One heatmap may grow tall with the rounds; in a grid each stays small enough to keep the page readable.
    height = min(9.0 if nrows == 1 else 4.2, max(2.4, 1.0 + 0.27 * n_rounds))
    fig = _figure(max(6.0, ncols * width + 1.4), nrows * height + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    values = [v for _, _, _, grid in panels for row in grid for v in row if v is not None]
    low, high = _color_range(values)
    cmap = _cmap()
    image = None
    for ax, (title, rounds, tasks, grid) in zip(axes, panels):
        image = _heatmap(ax, rounds, tasks, grid, cmap, low, high, max_ticks=int(height * 3.5))
        ax.set_title(title, fontsize=10)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes[: len(panels)].tolist(), label=metric_name(exp.metric), shrink=0.9,
                 aspect=30 if nrows == 1 else 15 * nrows)
    shown = ""
    if not exp.tasks_shared and len(exp.clients) > GRID_CLIENTS:
        shown = f" (first {GRID_CLIENTS} of {len(exp.clients)} clients)"
    fig.suptitle(f"{exp.label}: accuracy matrix, {metric_name(exp.metric)} by round and task{shown}")
    return fig


def _comparison(exps: Sequence[ExperimentReport]) -> Figure:
    panels = [("primary", lambda c: c.scores)]
    if any(c.maps for e in exps for c in e.clients) and any(e.metric != MAP_METRIC for e in exps):
        panels.append(("map", lambda c: c.maps))
    fig = _figure(6.4 * len(panels) + 2.4, 4.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    metrics = {e.metric for e in exps if e.metric is not None}
    only = next(iter(metrics)) if len(metrics) == 1 else None  # else the legend names each run's metric
    colors = _cmap("tab10" if len(exps) <= 10 else "tab20")
    for ax, (kind, pick) in zip(axes, panels):
        for i, exp in enumerate(exps):
            label = exp.label if only or kind == "map" else f"{exp.label} ({metric_name(exp.metric)})"
            # Marker and dash vary too, so runs with equal scores stay visible on top of each other.
            _mean_line(ax, [pick(c) for c in exp.clients], label, color=colors(i % colors.N), linewidth=2.0,
                       marker="osD^v"[i % 5], markersize=5, linestyle=("-", "--", ":", "-.")[i % 4])
        name = metric_name(MAP_METRIC) if kind == "map" else (metric_name(only) if only else "score")
        _label_score_axes(ax, f"mean {name} over clients", [pick(c) for e in exps for c in e.clients],
                          MAP_METRIC if kind == "map" else only)
        ax.set_title(name)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        _legend_outside(axes[-1], handles, labels, "experiment")
    fig.suptitle("Comparison of the runs: mean over clients by round")
    return fig


def _task_groups(exp: ExperimentReport) -> Figure:
    """FedSTIL's task-group curves: task k of every client's stream, averaged over the clients, by round."""
    fig = _figure(8.4, 4.6)
    ax = fig.subplots()
    colors = _cmap("tab10")
    longest = max(len(c.tasks) for c in exp.clients)
    for k in range(longest):
        per_client = [{r: {c.tasks[k]: row[c.tasks[k]]} for r, row in c.scores.items() if c.tasks[k] in row}
                      for c in exp.clients if k < len(c.tasks)]
        _mean_line(ax, per_client, f"task {k + 1}", color=colors(k % colors.N), linewidth=1.8,
                   marker="osD^v"[k % 5], markersize=4, linestyle=("-", "--", ":", "-.")[k % 4])
    _label_score_axes(ax, f"mean {metric_name(exp.metric)} over clients", [c.scores for c in exp.clients], exp.metric)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        _legend_outside(ax, handles, labels, "k-th task of\neach client")
    fig.suptitle(f"{exp.label}: {metric_name(exp.metric)} of each task group by round")
    return fig


def _forgetting(exps: Sequence[ExperimentReport]) -> Figure:
    fig = _figure(max(6.0, 1.2 * len(exps) + 3.0), 4.6)
    ax = fig.subplots()
    kinds = (("forgetting_fedstil", "FedSTIL (mean drop after the peak)"),
             ("forgetting_max_final", "max-final (best earlier − final)"))
    width = 0.38
    for j, (field, label) in enumerate(kinds):
        xs = [i + (j - 0.5) * width for i in range(len(exps))]
        values = [getattr(e, field) for e in exps]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width,
               label=label, color=("tab:red", "tab:gray")[j])
        for x, v in zip(xs, values):
            ax.annotate("n/a" if v is None else f"{v:.3f}", (x, 0.0 if v is None else v), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(exps)), [e.label for e in exps], rotation=30 if len(exps) > 3 else 0,
                  ha="right" if len(exps) > 3 else "center")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"forgetting ({', '.join(sorted({metric_name(e.metric) for e in exps}))})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    fig.suptitle("Forgetting per run (mean over clients; n/a: one task or too few rounds)")
    return fig


def _seed_groups(exps: Sequence[ExperimentReport]) -> list[list[ExperimentReport]]:
    """Runs that differ only in their random seed, two or more to a group, in report order."""
    groups: dict[str, list[ExperimentReport]] = {}
    for exp in exps:
        groups.setdefault(exp.group, []).append(exp)
    return [g for g in groups.values() if len(g) > 1]


def _seeds(groups: Sequence[Sequence[ExperimentReport]]) -> Figure:
    fig = _figure(9.2, 4.8)
    ax = fig.subplots()
    colors = _cmap("tab10")
    for i, group in enumerate(groups):
        runs = [dict(zip(*_run_means(e))) for e in group]
        rounds = sorted(set().union(*runs))
        stats = [np.array([r[rnd] for r in runs if rnd in r]) for rnd in rounds]
        mean = np.array([v.mean() for v in stats])
        spread = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in stats])
        color = colors(i % colors.N)
        seeds = ", ".join(str(e.seed) for e in group)
        ax.plot(rounds, mean, color=color, linewidth=2.0, marker="osD^v"[i % 5], markersize=4,
                label=f"{group[0].exp_name} ({group[0].method}), seeds {seeds}")
        ax.fill_between(rounds, mean - spread, mean + spread, color=color, alpha=0.2, linewidth=0)
    metrics = sorted({metric_name(e.metric) for g in groups for e in g})
    whose = "of the global model" if all(e.global_scores for g in groups for e in g) else "over clients"
    _label_score_axes(ax, f"mean {', '.join(metrics)} {whose}",
                      [c.scores for g in groups for e in g for c in e.clients], None)
    _legend_outside(ax, *ax.get_legend_handles_labels(), "mean ± 1 sd over seeds")
    fig.suptitle(f"Runs that differ only in random_seed: mean over seeds with a band of ±1 standard deviation")
    return fig


def _run_means(exp: ExperimentReport) -> tuple[list[int], list[float]]:
    """The run's score per round: the global model's where it was scored, else the mean over clients."""
    if exp.global_scores:
        return _task_means(exp.global_scores)
    by_round: dict[int, list[float]] = {}
    for c in exp.clients:
        for rnd, value in zip(*_task_means(c.scores)):
            by_round.setdefault(rnd, []).append(value)
    rounds = sorted(by_round)
    return rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds]


# --- pieces ------------------------------------------------------------------------------------------------


def _client_lines(ax, names: Sequence[str], per_client: Sequence[Scores], crowd: bool) -> None:
    colors = _cmap("tab10")
    for i, (name, scores) in enumerate(zip(names, per_client)):
        rounds, values = _task_means(scores)
        if not rounds:
            continue
        if crowd:
            label = f"{len(names)} clients" if i == 0 else "_nolegend_"
            ax.plot(rounds, values, color="tab:blue", alpha=0.35, linewidth=1.0, label=label)
        else:
            ax.plot(rounds, values, color=colors(i % colors.N), alpha=0.75, linewidth=1.2, label=name,
                    marker="." if len(rounds) <= MARKED_POINTS else None)


def _mean_line(ax, per_client: Sequence[Scores], label: str, **style) -> None:
    by_round: dict[int, list[float]] = {}
    for scores in per_client:
        for rnd, value in zip(*_task_means(scores)):
            by_round.setdefault(rnd, []).append(value)
    rounds = sorted(by_round)
    if len(rounds) > MARKED_POINTS:
        style["marker"] = None
    if rounds:
        ax.plot(rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds], label=label, **style)


def _legend_outside(ax, handles, labels, title: str) -> None:
    # Right of the axes rather than on the figure: constrained layout then keeps it clear of the suptitle.
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9,
              title=title, title_fontsize=9)


def _task_means(scores: Scores) -> tuple[list[int], list[float]]:
    """Each validated round and the client's score then, averaged over the tasks scored."""
    rounds = sorted(scores)
    return rounds, [sum(scores[r].values()) / len(scores[r]) for r in rounds]


def _label_score_axes(ax, ylabel: str, per_client: Sequence[Scores], metric: str | None) -> None:
    values = [v for scores in per_client for row in scores.values() for v in row.values()]
    if not values:
        _no_scores(ax, metric)
        return
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if all(0.0 <= v <= 1.0 for v in values):
        ax.set_ylim(-0.02, 1.02)  # a fraction: keep the whole 0..1 scale, so runs compare at a glance


def _matrix_panels(exp: ExperimentReport) -> list[tuple[str, list[int], tuple[str, ...], list[list[float | None]]]]:
    """(title, rounds, tasks, rounds-by-tasks grid) per heatmap: one mean when the clients share their tasks."""
    clients = [c for c in exp.clients if c.scores]
    matrices = [(c, *accuracy_matrix(c.scores, c.tasks)) for c in clients]
    if not exp.tasks_shared:
        return [(c.name, rounds, c.tasks, grid) for c, rounds, grid in matrices[:GRID_CLIENTS]]
    if not matrices:
        return []
    cells: dict[tuple[int, int], list[float]] = {}
    for _, rounds, grid in matrices:
        for rnd, row in zip(rounds, grid):
            for j, value in enumerate(row):
                if value is not None:
                    cells.setdefault((rnd, j), []).append(value)
    tasks = clients[0].tasks
    rounds = sorted({rnd for rnd, _ in cells})
    grid = [[_mean(cells.get((rnd, j), [])) for j in range(len(tasks))] for rnd in rounds]
    title = clients[0].name if len(clients) == 1 else f"mean over {len(clients)} clients"
    return [(title, rounds, tasks, grid)]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _heatmap(ax, rounds: list[int], tasks: Sequence[str], grid, cmap: Colormap, low: float, high: float, *,
             max_ticks: int):
    cells = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in grid], float))
    image = ax.imshow(cells, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if max(map(len, tasks)) > 6 else 0,
                  ha="right" if max(map(len, tasks)) > 6 else "center", fontsize=9)
    step = max(1, math.ceil(len(rounds) / max_ticks))
    ax.set_yticks(range(0, len(rounds), step), [str(r) for r in rounds[::step]], fontsize=9)
    ax.set_xlabel("task")
    ax.set_ylabel("round")
    if len(rounds) * len(tasks) <= ANNOTATE_CELLS:
        middle = (low + high) / 2
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                text = "–" if value is None else f"{value:.2f}"
                color = "black" if value is None or value > middle else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    return image


def _color_range(values: Sequence[float]) -> tuple[float, float]:
    # Fractions keep the full 0..1 scale, so colours mean the same in every report.
    if all(0.0 <= v <= 1.0 for v in values):
        return 0.0, 1.0
    low, high = min(values), max(values)
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _cmap(name: str = "viridis") -> Colormap:
    return colormaps[name].with_extremes(bad="#dddddd")  # bad: no score for that round and task


def _no_scores(ax, metric: str | None) -> None:
    what = f"{metric_name(metric)} scores" if metric else "validation scores"
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, fontsize=11)
    ax.set_axis_off()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, fmt: str = "png") -> Path:
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=DPI))
    return path
