"""Compare results CSVs across machines/backends: medians per label, ratios to a baseline."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

from reference_impl.results import CsvFormatError, metric_unit, read_results

GROUP_KEYS = ["suite", "test", "model", "params", "metric"]
LABEL_MODES = ("device", "file", "backend")
MAX_PLOT_ROWS = 40


def compare(
    paths, baseline: str | None = None, label_by: str = "device", metrics: list[str] | None = None,
    ignore_params: list[str] | None = None, exclude: list[str] | None = None,
) -> pd.DataFrame:
    """One row per (suite, test, model, params, metric); one median column per label,
    then `<label>/<baseline>` ratio columns. df.attrs holds 'labels', 'baseline' and 'ignored_params'.
    ignore_params: parameter names dropped before grouping, so runs that differ only there line up (say so
    wherever the table is shown: the rows then mix those settings).
    exclude: "NAME=VALUE" filters: rows whose params have NAME equal to VALUE are left out (step=0: the warm-up
    step, when Unsloth compiles), before ignore_params could drop NAME."""
    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if baseline and Path(baseline).is_file() and not _same_file_listed(baseline, paths):
        paths.append(baseline)  # `--baseline old.csv` compares against a file not listed
    df = read_results(paths)
    if metrics:
        df = df[df["metric"].isin(metrics)]
    for name, value in map(_parse_exclude, exclude or []):
        df = df[~df["params"].map(lambda text: _param_text(text, name) == value)]
    df = df.assign(label=_labels(df, label_by))  # from the params as written: param:NAME reads one
    label_param = _label_param(label_by)
    dropped = list(ignore_params or []) + ([label_param] if label_param else [])
    if dropped:
        df = df.assign(params=df["params"].map(lambda text: _without(text, dropped)))
    labels = list(dict.fromkeys(df["label"]))  # first-seen order, so the first file comes first
    base = _resolve_baseline(df, labels, baseline, paths)
    medians = df.groupby(GROUP_KEYS + ["label"], sort=False)["value"].median()
    # unstack (not pivot_table) keeps rows only some labels have, as NaN.
    table = medians.unstack("label").reindex(columns=labels)
    # Params in the order they were measured (batch 1, 8, 32), not as sorted JSON text.
    table = table.reindex(pd.MultiIndex.from_frame(df[GROUP_KEYS].drop_duplicates()))
    table.columns.name = None
    for label in labels:
        if label != base:
            ratio = table[label] / table[base]
            table[f"{label}/{base}"] = ratio.where(ratio.abs() != math.inf)  # x/0 is no ratio
    order = [key for key in GROUP_KEYS if key != "params"]
    table = table.reset_index().sort_values(order, kind="stable", ignore_index=True)
    table.attrs.update(labels=labels, baseline=base, ignored_params=list(ignore_params or []))
    return table


def _parse_exclude(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"exclude takes NAME=VALUE (e.g. step=0), got {spec!r}")
    return name, value


def _param_text(params_json: str, name: str) -> str | None:
    """The parameter as the command line writes it: 0, 1+3, true (JSON's text for non-strings)."""
    params = json.loads(params_json)
    if name not in params:
        return None
    value = params[name]
    return value if isinstance(value, str) else json.dumps(value)


def _without(params_json: str, names) -> str:
    params = json.loads(params_json)
    return json.dumps({k: v for k, v in params.items() if k not in names}, sort_keys=True, separators=(",", ":"))


def _label_param(label_by: str) -> str | None:
    """`param:layout` -> "layout": columns by that parameter's value (and device), rows matched without it."""
    if not label_by.startswith("param:"):
        return None
    name = label_by.split(":", 1)[1]
    if not name:
        raise ValueError("label_by param: needs a parameter name, e.g. param:layout")
    return name


def _labels(df: pd.DataFrame, label_by: str) -> pd.Series:
    if label_by not in LABEL_MODES and not _label_param(label_by):
        raise ValueError(f"label_by must be one of {', '.join(LABEL_MODES)} or param:NAME, got {label_by!r}")
    if label_by == "file":
        return df["source"].map(lambda source: Path(source).stem)
    device = df.apply(_device_label, axis=1) if len(df) else pd.Series([], dtype=str)
    if label_by == "backend":
        return df["backend"] + "@" + device
    name = _label_param(label_by)
    if name:  # a row without the parameter says so rather than joining another column
        values = df["params"].map(lambda text: json.loads(text).get(name, "unset"))
        return device + f" {name}=" + values.astype(str)
    return device


def _device_label(row: pd.Series) -> str:
    if row["device_kind"]:
        return row["device_kind"]
    return f"{row['gpu_count']}x{row['gpu_name']}" if row["gpu_name"] else "cpu"


def _same_file_listed(candidate: str, paths: list[str]) -> bool:
    target = Path(candidate).resolve()
    return any(Path(p).resolve() == target for p in paths)


def _resolve_baseline(df: pd.DataFrame, labels: list[str], baseline, paths) -> str:
    if not labels:
        return baseline or ""
    if baseline is None:
        first = df[df["source"] == str(Path(paths[0]))]  # read_results stores str(Path(p))
        return first["label"].iloc[0] if len(first) else labels[0]
    if baseline in labels:
        return baseline
    target = Path(baseline).resolve()
    from_file = df[df["source"].map(lambda s: Path(s).resolve() == target)]
    if len(from_file):
        return from_file["label"].iloc[0]
    raise ValueError(f"baseline {baseline!r} is neither a label ({', '.join(labels)}) nor a compared file")


def format_table(df: pd.DataFrame) -> str:
    """Fixed-width table; the metric column carries the unit, NaN shows as '-'."""
    if df.empty:
        return "(no results)"
    ratio_columns = [c for c in df.columns if "/" in str(c)]
    formatters = {c: _fmt_ratio for c in ratio_columns}
    formatters.update({c: _fmt_value for c in df.attrs.get("labels", []) if c in df.columns})
    body = df.to_string(index=False, na_rep="-", formatters=formatters)
    return f"baseline: {df.attrs.get('baseline', '')}\n{body}"


def _fmt_value(value) -> str:
    return "-" if pd.isna(value) else f"{value:.4g}"


def _fmt_ratio(value) -> str:
    return "-" if pd.isna(value) else f"{value:.3f}x"


def plot(df: pd.DataFrame, out_png) -> None:
    """Grouped horizontal bars per (test, metric, params), one subplot per unit."""
    # Figure + Agg canvas directly (not pyplot): headless, and no global backend switch
    # that would surprise other code in the same process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [c for c in df.attrs.get("labels", []) if c in df.columns]
    shown = df.head(MAX_PLOT_ROWS)
    families = list(dict.fromkeys(shown["metric"].map(metric_unit))) if len(shown) else []
    heights = [max(1.5, 0.35 * len(labels) * _family_rows(shown, f).shape[0] + 1) for f in families]
    fig = Figure(figsize=(11, max(3.0, sum(heights) + 1)))
    FigureCanvasAgg(fig)
    title = f"splitrl compare (baseline: {df.attrs.get('baseline', '')})"
    if len(df) > len(shown):
        title += f" - first {len(shown)} of {len(df)} rows shown"
    fig.suptitle(title)
    if not families:
        fig.text(0.5, 0.5, "no results to plot", ha="center")
    else:
        axes = fig.subplots(len(families), 1, squeeze=False, height_ratios=heights)[:, 0]
        for ax, family in zip(axes, families):
            _plot_family(ax, _family_rows(shown, family), labels, family)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=100)


def _family_rows(df: pd.DataFrame, family: str) -> pd.DataFrame:
    return df[df["metric"].map(metric_unit) == family]


def _plot_family(ax, rows: pd.DataFrame, labels: list[str], family: str) -> None:
    bar_height = 0.8 / max(1, len(labels))
    positions = range(len(rows))
    for i, label in enumerate(labels):
        offsets = [p + i * bar_height for p in positions]
        # inf (e.g. a crossover that never happens) has no bar length: drawn as no bar, the table says inf
        ax.barh(offsets, rows[label].replace([math.inf, -math.inf], math.nan), height=bar_height, label=label)
    ax.set_yticks([p + 0.4 - bar_height / 2 for p in positions])
    shared = _shared_params(rows) if len(rows) > 1 else frozenset()
    ax.set_yticklabels([_row_name(r, shared) for _, r in rows.iterrows()], fontsize=7)
    ax.invert_yaxis()  # table order, top to bottom
    ax.set_xlabel(family)
    ax.legend(fontsize=7, loc="lower right")


def _row_name(row: pd.Series, shared: frozenset = frozenset()) -> str:
    """Test, model, metric and the params that tell this row apart (those equal on every plotted row left out:
    a label cut at 70 characters would otherwise lose exactly the distinguishing ones)."""
    params = {k: v for k, v in json.loads(row["params"]).items() if (k, json.dumps(v)) not in shared}
    text = ",".join(f"{k}={v}" for k, v in params.items())
    name = f"{row['test']} {row['model']} {row['metric']} {text}".strip()
    return name if len(name) <= 70 else name[:67] + "..."


def _shared_params(rows: pd.DataFrame) -> frozenset:
    """(key, value) pairs every row's params has."""
    pairs = [{(k, json.dumps(v)) for k, v in json.loads(p).items()} for p in rows["params"]]
    return frozenset(set.intersection(*pairs)) if pairs else frozenset()


def main_compare(argv_paths, baseline=None, plot_path=None, label_by="device", metrics=None,
                 ignore_params=None, exclude=None) -> int:
    """CLI entry: print the table (and write the plot); 2 on unreadable input."""
    try:
        df = compare(argv_paths, baseline=baseline, label_by=label_by, metrics=metrics, ignore_params=ignore_params,
                     exclude=exclude)
    except (CsvFormatError, ValueError, OSError) as error:
        print(_one_line(error), file=sys.stderr)
        return 2
    if ignore_params:
        print(f"params ignored (rows mix their values): {', '.join(ignore_params)}")
    if exclude:
        print(f"rows left out: {', '.join(exclude)}")
    if _label_param(label_by):
        print(f"columns by {label_by} (rows matched without it)")
    print(format_table(df))
    if plot_path:
        plot(df, plot_path)
        print(f"wrote {plot_path}")
    return 0


def _one_line(error: Exception) -> str:
    if isinstance(error, CsvFormatError):
        return str(error)
    return f"error: {' '.join(str(error).split())}"
