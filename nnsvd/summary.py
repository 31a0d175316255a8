"""One table and one plot per sweep: every job of a Hydra multirun, ok or not.

``collect`` reads the job directories of a sweep (``.hydra/overrides.yaml`` and
``results.json``) into flat rows; ``write_summary`` writes ``summary.csv``, ``summary.md``
and ``summary.png`` beside them; ``log_summary_to_wandb`` adds a "summary" run to the
sweep's W&B group. ``summarize`` does all three; the Hydra callback in
``nnsvd.callbacks`` and ``scripts/summarize.py`` call it.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import yaml

from nnsvd.pipeline import regularizer_label
from nnsvd.tracking import RESULTS, read_results, wandb_group

log = logging.getLogger(__name__)

REFERENCE_CSV = Path(__file__).parent / "reference" / "seed_mlp_results.csv"
REFERENCE_LABEL = "original (published, dropout at eval)"

# The main metric of each model, and how to show it: (axis label, y scale, number format).
METRICS = {"mlp": "test_acc", "gpt2": "test_ppl", "causal_lm": "test_ppl"}
METRIC_STYLES = {
    "test_acc": ("test accuracy", "linear", "{:.4f}"),
    "test_ppl": ("test perplexity", "log", "{:.2f}"),
}

COLUMNS = [
    "job",
    "overrides",
    "status",
    "error",
    "model",
    "mode",
    "rank",
    "method",  # compress.method of a compress job (with "+seq" when calibrated sequentially)
    "regularizer",
    "alpha",
    "seed",
    "metric",
    "value",  # the main metric of the final model (after fine-tuning if there was any)
    "dense_value",  # the dense model's, measured by a compress job
    "compressed_value",  # right after compression, before fine-tuning
    "params",
    "dense_params",
    "compression_ratio",  # params / dense params of the whole model
    "target_compression_ratio",  # the same over the factorized layers only
    "time_s",
]


# ------------------------------------------------------------------- collect


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job directory of the sweep, in job-number order.

    A job directory is a subdirectory holding ``.hydra/overrides.yaml`` or ``results.json``.
    A job without results.json (killed before it could write one) has status "missing";
    what it was meant to run is then read from its ``.hydra/config.yaml``.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    jobs = [
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and ((d / ".hydra" / "overrides.yaml").is_file() or (d / RESULTS).is_file())
    ]
    return [job_row(d) for d in sorted(jobs, key=_job_order)]


def _job_order(job_dir: Path) -> tuple[int, str]:
    """Job directories are named "<job num>_<overrides>" (before: "<job num>-<overrides>");
    sort by the number, not the text."""
    match = re.match(r"(\d+)(?:[_-]|$)", job_dir.name)
    return (int(match.group(1)) if match else 1 << 62, job_dir.name)


def job_row(job_dir: Path) -> dict:
    """The summary row of one job directory."""
    results = read_results(job_dir)
    row = dict.fromkeys(COLUMNS)
    row["job"] = job_dir.name
    row["overrides"] = ",".join(_overrides(job_dir, results))
    if results is None:
        row.update(status="missing", error=f"no {RESULTS}: the job did not finish", **_planned(job_dir))
        row["metric"] = METRICS.get(row["model"])
        return row

    reg = results.get("regularizer") or {}
    metrics = results.get("metrics") or {}
    params = results.get("params") or {}
    metric = METRICS.get(results.get("model"))
    value = metrics.get(metric) if metric else None
    row.update(
        status=results.get("status", "unknown"),
        error=results.get("error"),
        model=results.get("model"),
        mode=results.get("mode"),
        rank=results.get("rank"),
        method=_method_label(results.get("compress")),
        regularizer=reg.get("label"),
        alpha=reg.get("alpha"),
        seed=results.get("seed"),
        metric=metric,
        value=value if value is not None else results.get("main_metric"),
        dense_value=metrics.get(f"dense_{metric}"),
        compressed_value=metrics.get(f"compressed_{metric}"),
        params=params.get("total"),
        dense_params=params.get("dense_total"),
        compression_ratio=params.get("compression_ratio"),
        target_compression_ratio=params.get("target_compression_ratio"),
        time_s=(results.get("timing") or {}).get("total_s"),
    )
    return row


def _method_label(compress: dict | None) -> str | None:
    """The compression method of a job, e.g. "whiten" or "whiten+seq"; None for dense and scratch jobs."""
    if not compress:
        return None
    calibration = compress.get("calibration") or {}
    return compress.get("method") + ("+seq" if calibration.get("sequential") else "")


def _overrides(job_dir: Path, results: dict | None) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in yaml.safe_load(path.read_text()) or []]
    return list((results or {}).get("overrides") or [])


def _planned(job_dir: Path) -> dict:
    """Model, mode, rank and regularizer a job was configured with, from .hydra/config.yaml."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    c = yaml.safe_load(path.read_text()) or {}
    reg = c.get("regularizer") or {}
    rank = c.get("rank")
    return {
        "model": (c.get("model") or {}).get("name"),
        # the default run_job applies when mode is unset
        "mode": c.get("mode") or ("dense" if rank is None else "compress"),
        "rank": rank,
        "regularizer": regularizer_label(reg) if {"symmetric", "alpha"} <= reg.keys() else reg.get("name"),
        "alpha": reg.get("alpha"),
        "seed": c.get("seed"),
    }


def status_counts(rows: Sequence[dict]) -> str:
    """The jobs counted by status, ok first: "4 ok, 1 failed, 1 missing"."""
    counts = Counter(row["status"] for row in rows)
    ordered = sorted(counts.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    return ", ".join(f"{n} {status}" for status, n in ordered) or "no jobs"


def not_ok(rows: Sequence[dict]) -> list[dict]:
    return [row for row in rows if row["status"] != "ok"]


# ------------------------------------------------------------------- curves


def line_key(row: dict) -> tuple:
    """What one line of the plot holds: (mode, regularizer label, alpha, method)."""
    return (row["mode"], row["regularizer"], float(row["alpha"] or 0.0), row.get("method") or "")


def line_label(key: tuple) -> str:
    mode, regularizer, alpha, method = key
    plain = method in ("", "auto")
    return f"{mode}{'' if plain else ' · ' + method} · {regularizer}" + (f" α={alpha:g}" if alpha > 0 else "")


def curves(rows: Sequence[dict], model: str) -> dict[tuple[str, str, float], list[tuple[int, float]]]:
    """Main metric against rank for each line of one model's ok jobs, ranks ascending.

    Jobs that differ only in what the line does not show (e.g. the seed) are averaged.
    """
    points: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if (
            row["status"] == "ok"
            and row["model"] == model
            and row["rank"] is not None
            and row["value"] is not None
        ):
            points[line_key(row)][row["rank"]].append(row["value"])
    return {
        key: [(rank, _mean(values)) for rank, values in sorted(by_rank.items())]
        for key, by_rank in sorted(points.items())
    }


def dense_reference(rows: Sequence[dict], model: str) -> tuple[float, str] | None:
    """The dense model's metric: from dense-mode jobs, else as measured by compress jobs."""
    ok = [row for row in rows if row["status"] == "ok" and row["model"] == model]
    dense = [row["value"] for row in ok if row["mode"] == "dense" and row["value"] is not None]
    if dense:
        return _mean(dense), "dense (this sweep)"
    measured = [row["dense_value"] for row in ok if row["dense_value"] is not None]
    if measured:
        return _mean(measured), "dense (measured by compress jobs)"
    return None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# -------------------------------------------------------------------- write


def write_summary(
    sweep_dir: str | Path, rows: Sequence[dict], *, reference: Path | None = None
) -> dict[str, Path]:
    """Write summary.csv, summary.md and summary.png into the sweep directory.

    ``reference`` is a CSV of published MLP numbers (see ``REFERENCE_CSV``) drawn dashed
    on the MLP plot.
    """
    sweep_dir = Path(sweep_dir)
    paths = {
        "csv": sweep_dir / "summary.csv",
        "md": sweep_dir / "summary.md",
        "png": sweep_dir / "summary.png",
    }
    write_csv(paths["csv"], rows)
    paths["md"].write_text(markdown_table(rows, title=f"Sweep summary: {sweep_dir}"))
    plot_summary(
        paths["png"], rows, title=f"{_short_name(sweep_dir)}: {status_counts(rows)}", reference=reference
    )
    return paths


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict], *, title: str) -> str:
    """A Markdown page: a heading, the job counts and one table row per job."""
    metrics = sorted({row["metric"] for row in rows if row["metric"]})
    metric = metrics[0] if len(metrics) == 1 else "main metric"
    header = [
        "job",
        "status",
        "model",
        "mode",
        "rank",
        "method",
        "regularizer",
        "alpha",
        metric,
        "dense",
        "before fine-tuning",
        "params",
        "ratio",
        "time (s)",
        "error",
    ]
    lines = [
        f"# {title}",
        "",
        f"{len(rows)} jobs: {status_counts(rows)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        cells = [
            row["job"],
            row["status"] if row["status"] == "ok" else f"**{row['status']}**",
            row["model"],
            row["mode"],
            row["rank"],
            row.get("method") or "",
            row["regularizer"],
            f"{row['alpha']:g}" if row["alpha"] else "",
            _number(row["value"], row["metric"]),
            _number(row["dense_value"], row["metric"]),
            _number(row["compressed_value"], row["metric"]),
            f"{row['params']:,}" if row["params"] is not None else "",
            f"{row['compression_ratio']:.3f}" if row["compression_ratio"] is not None else "",
            f"{row['time_s']:.1f}" if row["time_s"] is not None else "",
            shorten(row["error"]),
        ]
        lines.append("| " + " | ".join("" if c is None else str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, metric: str | None) -> str:
    if value is None:
        return ""
    return METRIC_STYLES[metric][2].format(value) if metric in METRIC_STYLES else f"{value:.4g}"


def shorten(error: str | None, width: int = 100) -> str:
    """The first line of an error message, cut to ``width`` characters."""
    if not error:
        return ""
    line = " ".join(error.strip().splitlines()[0].split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _short_name(sweep_dir: Path) -> str:
    """The last two parts of the sweep directory: Hydra's default is <date>/<time>."""
    return "/".join(sweep_dir.resolve().parts[-2:])


# --------------------------------------------------------------------- plot


def plot_summary(path: Path, rows: Sequence[dict], *, title: str, reference: Path | None = None) -> None:
    """Main metric against rank (log2), one line per (mode, regularizer, alpha), one panel per model.

    The top axis gives the whole model's size relative to dense at each rank; the dense
    model is a horizontal line. Jobs that did not finish ok are left out (the table lists
    them). For the MLP, ``reference`` adds the published numbers of the same lines, dashed.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no global backend

    models = sorted({row["model"] for row in rows if row["status"] == "ok" and row["model"] in METRICS})
    fig = Figure(figsize=(10, 5.5 * max(1, len(models))), dpi=120, layout="constrained")
    fig.suptitle(title, fontsize="large")
    if not models:
        ax = fig.subplots()
        ax.text(
            0.5, 0.5, "no job finished ok: nothing to plot", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_axis_off()
    else:
        for ax, model in zip(fig.subplots(len(models), 1, squeeze=False)[:, 0], models):
            _plot_model(ax, rows, model, reference if model == "mlp" else None)
    fig.savefig(path)


def _plot_model(ax, rows: Sequence[dict], model: str, reference: Path | None) -> None:
    metric = METRICS[model]
    ylabel, yscale, _ = METRIC_STYLES[metric]
    lines = curves(rows, model)
    colours = {key: f"C{i % 10}" for i, key in enumerate(lines)}
    for key, points in lines.items():
        ranks, values = zip(*points)
        ax.plot(ranks, values, marker="o", color=colours[key], label=line_label(key))

    dense = dense_reference(rows, model)
    if dense is not None:
        ax.axhline(dense[0], color="black", linewidth=1.2, label=f"{dense[1]}: {_number(dense[0], metric)}")
    published_ranks = _draw_reference(ax, reference, colours) if reference is not None else []

    ranks = sorted({rank for points in lines.values() for rank, _ in points})
    if ranks:
        _rank_axes(ax, ranks, _ratios_at(rows, model, ranks), published_ranks)
    else:
        ax.text(0.5, 0.5, "no ok job with a rank", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("rank")
    ax.set_ylabel(f"{ylabel}, model={model}")
    ax.set_yscale(yscale)
    if yscale == "log":
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="minor", alpha=0.15)
    ax.grid(True, which="major", alpha=0.4)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _draw_reference(ax, reference: Path, colours: dict) -> list[int]:
    """The published lines this sweep also ran (like against like), dashed in the same
    colours, and the published dense accuracy; returns the ranks drawn."""
    published, published_dense = read_reference(reference)
    drawn = {key: points for key, points in published.items() if key in colours}
    for key, points in drawn.items():
        ranks, values = zip(*points)
        ax.plot(ranks, values, linestyle="--", marker="x", color=colours[key], alpha=0.8)
    if published_dense is not None:
        ax.axhline(published_dense, color="black", linestyle="--", linewidth=1.0, alpha=0.8)
    if drawn or published_dense is not None:  # one legend entry for all of them
        ax.plot([], [], linestyle="--", marker="x", color="grey", label=REFERENCE_LABEL)
    return sorted({rank for points in drawn.values() for rank, _ in points})


def _rank_axes(ax, ranks: Sequence[int], ratios: dict[int, float], published_ranks: Sequence[int]) -> None:
    """Bottom: rank on a log2 scale, ticked at the sweep's ranks (and the published ones that do
    not crowd them, e.g. 31 beside 32). Top: the whole model's size relative to dense."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = list(ranks)
    for rank in published_ranks:
        if all(abs(math.log2(rank / t)) > 0.2 for t in ticks):
            ticks.append(rank)
    ticks.sort()
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks, labels=[str(r) for r in ticks])
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(ranks), labels=[f"{ratios[r]:.2g}" if r in ratios else "" for r in ranks])
    top.xaxis.set_minor_locator(NullLocator())
    top.xaxis.set_minor_formatter(NullFormatter())
    top.set_xlabel("params / dense params of the whole model (mean over the jobs at that rank)")


def _ratios_at(rows: Sequence[dict], model: str, ranks: Sequence[int]) -> dict[int, float]:
    by_rank = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row["model"] == model and row["compression_ratio"] is not None:
            by_rank[row["rank"]].append(row["compression_ratio"])
    return {rank: _mean(by_rank[rank]) for rank in ranks if by_rank[rank]}


def read_reference(path: Path) -> tuple[dict[tuple[str, str, float], list[tuple[int, float]]], float | None]:
    """Published numbers as lines keyed like ``line_key`` and the dense accuracy.

    The CSV has columns flow,rank,regularizer,alpha,test_acc; the dense row has no rank.
    """
    lines: dict = defaultdict(list)
    dense = None
    with Path(path).open(newline="") as f:
        for record in csv.DictReader(f):
            value = float(record["test_acc"])
            if not record["rank"]:
                dense = value
                continue
            method = "auto" if record["flow"] == "compress" else ""  # the original compressed by plain SVD
            key = (record["flow"], record["regularizer"], float(record["alpha"] or 0.0), method)
            lines[key].append((int(record["rank"]), value))
    return {key: sorted(points) for key, points in lines.items()}, dense


# -------------------------------------------------------------------- W&B


def log_summary_to_wandb(
    rows: Sequence[dict],
    *,
    group: str,
    project: str,
    entity: str | None,
    mode: str,
    sweep_dir: str | Path,
    png_path: Path | None,
) -> None:
    """One "summary" run in the sweep's W&B group: the rows as a table, metric-vs-rank lines, the PNG.

    The run finishes with exit code 1 when a job did not finish ok, so the dashboard
    marks the sweep. mode="disabled" does nothing.
    """
    if mode == "disabled":
        return
    import wandb

    failed = not_ok(rows)
    run = wandb.init(
        mode=mode,
        project=project,
        entity=entity,
        group=group,
        name="summary",
        job_type="summary",
        dir=str(sweep_dir),
        config={"sweep_dir": str(Path(sweep_dir).resolve()), "jobs": len(rows)},
        reinit="finish_previous",
        settings=wandb.Settings(quiet=True, console="off"),
    )
    logged = False
    try:
        payload = {
            "summary/jobs": wandb.Table(columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows]),
        }
        for model in sorted({row["model"] for row in rows if row["model"] in METRICS}):
            lines = curves(rows, model)
            if lines:
                payload[f"summary/{model}_{METRICS[model]}_vs_rank"] = wandb.plot.line_series(
                    xs=[[rank for rank, _ in points] for points in lines.values()],
                    ys=[[value for _, value in points] for points in lines.values()],
                    keys=[line_label(key) for key in lines],
                    title=f"{model}: {METRICS[model]} vs rank",
                    xname="rank",
                )
        if png_path is not None and Path(png_path).is_file():
            payload["summary/plot"] = wandb.Image(str(png_path))
        run.log(payload)
        run.summary.update(
            {"jobs": len(rows), "jobs_ok": len(rows) - len(failed), "jobs_failed": len(failed)}
        )
        logged = True
        log.info("W&B %s summary run in group %s (%s)", mode, group, run.dir)
    finally:
        run.finish(exit_code=0 if logged and not failed else 1)


# ---------------------------------------------------------------- together


def summarize(
    sweep_dir: str | Path,
    *,
    reference: Path | None = None,
    wandb_mode: str = "disabled",
    project: str = "nn-svd",
    entity: str | None = None,
    group: str | None = None,
) -> tuple[list[dict], dict[str, Path]]:
    """Collect a sweep, write its summary files and (unless disabled) log them to W&B.

    The W&B run joins ``group``, by default the sweep's own group (``wandb_group``), which
    is where run_job puts the jobs unless wandb.group was set.
    """
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    paths = write_summary(sweep_dir, rows, reference=reference)
    log_summary_to_wandb(
        rows,
        group=group or wandb_group(sweep_dir),
        project=project,
        entity=entity,
        mode=wandb_mode,
        sweep_dir=sweep_dir,
        png_path=paths["png"],
    )
    return rows, paths
