"""The results CSV store: one row per measured number, with the machine's fingerprint.

Long format (one number per row) so that new metrics never change the header and
files from different runs/machines concatenate without schema migrations.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import secrets
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd

from reference_impl.fingerprint import FINGERPRINT_KEYS, collect_fingerprint

UNIT_SUFFIXES: tuple[str, ...] = (
    "_tok_s", "_ms", "_s", "_mib", "_gb", "_ratio", "_pct", "_count", "_tokens", "_mbu",
    "_tokens_per_step",  # crossover_tokens_per_step (reference_impl/crossover.py)
    "_steps",  # policy versions a sample lags the trainer (pipelined runs)
)
# Dimensionless metrics that are recognisable by name alone.
BARE_METRICS: tuple[str, ...] = ("reward", "loss", "mbu", "passed",
                                  "ddp_rank_param_spread")  # max - min over DDP ranks of the LoRA weight sum

CORE_COLUMNS: list[str] = [
    "run_id", "timestamp_utc", "suite", "test", "backend", "mode", "strategy",
    "model", "params", "metric", "value",
]
RESULT_COLUMNS: list[str] = CORE_COLUMNS + FINGERPRINT_KEYS

_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]*")


class CsvFormatError(ValueError):
    """A results CSV that cannot be trusted; str() is one line: '<path>: row <n>: <problem>'."""

    def __init__(self, path, row: int | str, problem: str):
        self.path, self.row = str(path), row
        self.problem = " ".join(str(problem).split())  # keep the message on one line
        super().__init__(f"{self.path}: row {row}: {self.problem}")


def _allowed_metrics_text() -> str:
    return f"unit suffixes {', '.join(UNIT_SUFFIXES)} or bare names {', '.join(BARE_METRICS)}"


def metric_unit(metric: str) -> str:
    """Unit of a metric name: its suffix without '_' (longest match), or the bare name."""
    if metric in BARE_METRICS:
        return metric
    # Longest first: '_tok_s' must win over '_s'.
    for suffix in sorted(UNIT_SUFFIXES, key=len, reverse=True):
        if metric.endswith(suffix) and len(metric) > len(suffix):
            return suffix[1:]
    raise ValueError(f"metric {metric!r} has no known unit; allowed: {_allowed_metrics_text()}")


def validate_metric(metric: str) -> str:
    if not isinstance(metric, str) or not _METRIC_NAME.fullmatch(metric):
        raise ValueError(f"metric {metric!r} must be lower_snake_case; allowed: {_allowed_metrics_text()}")
    metric_unit(metric)
    return metric


def params_json(params: dict) -> str:
    """Canonical params string: sorted keys, no spaces, so equal params compare equal."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict, got {type(params).__name__}")
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


@dataclass
class ResultRow:
    suite: str
    test: str
    metric: str
    value: float
    backend: str = ""                  # "": the writer's default_backend (the backend the running test serves)
    mode: str = ""
    strategy: str = ""
    model: str = ""
    params: dict = field(default_factory=dict)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def default_run_id(now: datetime | None = None) -> str:
    return f"{(now or utc_now()):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class ResultsWriter:
    """Appends ResultRows to a CSV atomically (temp file + fsync + os.replace, under a lock)."""

    def __init__(self, path, run_id: str | None = None, fingerprint: dict | None = None,
                 default_backend: str | Callable[[], str] = "sglang"):
        self.path = Path(path)
        # a callable: one session writer serves tests of several backends (--backend both), each row takes the
        # backend of the test that wrote it unless the row names its own (e.g. the TRL peer's "trl-hf")
        self.default_backend = default_backend
        self.run_id = run_id or default_run_id()
        fp = collect_fingerprint() if fingerprint is None else fingerprint
        self.fingerprint = {key: str(fp.get(key, "") or "") for key in FINGERPRINT_KEYS}

    def append(self, row_or_rows: ResultRow | Iterable[ResultRow]) -> int:
        """Append one or more rows; returns how many were written."""
        rows = [row_or_rows] if isinstance(row_or_rows, ResultRow) else list(row_or_rows)
        lines = [self._to_record(row) for row in rows]  # validate all before touching the file
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(self.path):
            old = self._existing_content()
            self._replace_atomically(old + _csv_text(lines))
        return len(lines)

    def _to_record(self, row: ResultRow) -> list[str]:
        value = float(row.value)  # raises on non-numbers: every row is one measured number
        record = {
            "run_id": self.run_id,
            "timestamp_utc": utc_now().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "suite": row.suite, "test": row.test, "backend": row.backend or self._default_backend(), "mode": row.mode,
            "strategy": row.strategy, "model": row.model, "params": params_json(row.params),
            "metric": validate_metric(row.metric), "value": repr(value),
            **self.fingerprint,
        }
        return [str(record[col]) for col in RESULT_COLUMNS]

    def _default_backend(self) -> str:
        return self.default_backend() if callable(self.default_backend) else self.default_backend

    def _existing_content(self) -> str:
        """Current file text, or a fresh header; refuses files written with another schema."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        if not text.strip():
            return _csv_text([RESULT_COLUMNS])
        header = next(csv.reader([text.splitlines()[0]]))
        if header != RESULT_COLUMNS:
            raise CsvFormatError(
                self.path, "1 (header)",
                f"header differs from the results schema ({_header_diff(header)}); refusing to append",
            )
        return text if text.endswith("\n") else text + "\n"

    def _replace_atomically(self, content: str) -> None:
        mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)  # mkstemp makes 0600; keep the file readable like before
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)  # make the rename itself durable


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    # A separate lock file: locking the CSV itself would not work because
    # os.replace swaps in a new inode, so the next writer would lock a different file.
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is already synced
    finally:
        os.close(fd)


def _csv_text(records: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(records)
    return buffer.getvalue()


def _header_diff(header: list[str]) -> str:
    missing = [c for c in RESULT_COLUMNS if c not in header]
    extra = [c for c in header if c not in RESULT_COLUMNS]
    if missing or extra:
        return f"missing {missing}, unexpected {extra}"
    return "same columns in a different order"


# ---------------------------------------------------------------- reading


def read_results(paths) -> pd.DataFrame:
    """Read and validate one or more results CSVs into one DataFrame (+ `source` column)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = [_read_one(Path(p)) for p in paths]
    columns = RESULT_COLUMNS + ["source"]
    if not frames:
        return pd.DataFrame(columns=columns)
    df = pd.concat(frames, ignore_index=True)
    df["value"] = df["value"].astype(float)
    return df


def _read_one(path: Path) -> pd.DataFrame:
    text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or not any(cell.strip() for cell in header):
        raise CsvFormatError(path, 1, "empty file: no header")
    for column in CORE_COLUMNS:
        if column not in header:
            raise CsvFormatError(path, "1 (header)", f"missing column {column!r}")
    records = []
    while True:
        # A quoted field may span lines; report the line where the record starts.
        first_line = reader.line_num + 1
        fields = next(reader, None)
        if fields is None:
            break
        if fields:  # skip blank lines
            records.append(_parse_record(path, first_line, header, fields))
    df = pd.DataFrame(records, columns=list(dict.fromkeys(header + FINGERPRINT_KEYS)))
    # Older/hand-made files may lack some fingerprint columns; treat them as unknown.
    df[FINGERPRINT_KEYS] = df[FINGERPRINT_KEYS].fillna("")
    df["source"] = str(path)
    return df


def _parse_record(path: Path, line: int, header: list[str], fields: list[str]) -> dict:
    if len(fields) != len(header):
        raise CsvFormatError(path, line, f"expected {len(header)} fields, found {len(fields)}")
    record = dict(zip(header, fields))
    record["value"] = _parse_value(path, line, record["value"])
    record["params"] = _parse_params(path, line, record["params"])
    try:
        validate_metric(record["metric"])
    except ValueError as error:
        raise CsvFormatError(path, line, str(error)) from None
    return record


def _parse_value(path: Path, line: int, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise CsvFormatError(path, line, f"value {raw!r} is not a number") from None


def _parse_params(path: Path, line: int, raw: str) -> str:
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CsvFormatError(path, line, f"params is not valid JSON ({error.msg}): {raw!r}") from None
    if not isinstance(params, dict):
        raise CsvFormatError(path, line, f"params must be a JSON object, got {raw!r}")
    return params_json(params)  # canonical form so hand-edited files group correctly
