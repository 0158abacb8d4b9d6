"""Local evaluation tasks: a small YAML names the files, columns and split; this module reads them as they are.

Pure Python (no mteb): `load_spec` validates a task YAML, `read_task` turns its files into plain rows. The
mteb task objects are built from those rows in `speed_ray.evaluate.mteb_tasks`. The format is in
docs/EVALUATION.md.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from speed_ray.config import ConfigError

log = logging.getLogger("speed_ray.evaluate")
TASK_TYPES = ("sts", "retrieval", "classification", "pair_classification")
MTEB_TYPES = {"sts": "STS", "retrieval": "Retrieval", "classification": "Classification",
              "pair_classification": "PairClassification"}
MAIN_SCORES = {"sts": "cosine_spearman", "retrieval": "ndcg_at_10", "classification": "accuracy",
               "pair_classification": "max_ap"}
# The roles each table needs (columns: role -> column name or 0-based index).
ROLES = {
    "sts": ({"sentence1", "sentence2", "score"}, set()),
    "pair_classification": ({"sentence1", "sentence2", "label"}, set()),
    "classification": ({"text", "label"}, set()),
    "corpus": ({"id", "text"}, {"title"}),
    "queries": ({"id", "text"}, {"relevant"}),
    "qrels": ({"query_id", "doc_id"}, {"score"}),
}
# What a row needs to be usable, per table: roles that must not be empty, and roles that must be numbers. A row
# that fails is an error naming the file, line and column, or with `skip_bad_lines: true` skipped and counted.
ROW_CHECKS: dict[str, tuple[frozenset, frozenset]] = {
    "sts": (frozenset({"sentence1", "sentence2"}), frozenset({"score"})),
    "pair_classification": (frozenset({"sentence1", "sentence2"}), frozenset({"label"})),
    "classification": (frozenset({"text", "label"}), frozenset()),
    "corpus": (frozenset({"id"}), frozenset()),
    "queries": (frozenset({"id", "text"}), frozenset()),
    "qrels": (frozenset({"query_id", "doc_id"}), frozenset({"score"})),
}
SKIP_HINT = "set `skip_bad_lines: true` in the task YAML to skip such rows"
PARSERS = ("quoted_strings", "id_list")
_FORMAT_KEYS = {"delimiter", "header", "quoting", "encoding", "jsonl", "skip_bad_lines"}
_TABLE_KEYS = {"files", "columns", "parse", "format"}
_TASK_KEYS = {"name", "type", "description", "instruction", "data_root", "split", "main_score", "format",
              "score_range", "labels", "n_experiments", "samples_per_label", "seed", "beir", "skip_bad_lines",
              "test", "train", "corpus", "queries", "qrels"} | _TABLE_KEYS


class LocalTaskError(ConfigError):
    """A task YAML or one of its data files is wrong: the message names the file and the key or line."""


@dataclass(frozen=True)
class Table:
    """Rows from one or more files that share a format and column mapping."""

    files: tuple[str, ...]
    columns: dict[str, str | int]
    parse: dict[str, str] = field(default_factory=dict)
    format: dict[str, Any] = field(default_factory=dict)
    key: str = ""                                  # where it sits in the YAML, for error messages


@dataclass(frozen=True)
class LocalTaskSpec:
    name: str
    type: str
    source: str                                    # the YAML file
    data_root: str                                 # resolved directory relative file paths start from
    split: str = "test"
    description: str = ""
    instruction: str | None = None
    main_score: str = ""
    score_range: tuple[float, float] = (0.0, 5.0)
    n_experiments: int = 10                        # classification: mteb's defaults
    samples_per_label: int = 8
    seed: int = 42
    labels: tuple[str, ...] | str | None = None   # classification: label order (a list, or a JSON list file)
    tables: dict[str, Table] = field(default_factory=dict)   # test/train | corpus/queries/qrels

    def files(self) -> list[Path]:
        return [self.path(f) for t in self.tables.values() for f in t.files]

    def missing_files(self) -> list[Path]:
        return [p for p in self.files() if not p.exists()]

    def path(self, rel: str) -> Path:
        p = Path(os.path.expanduser(rel))
        return p if p.is_absolute() else Path(self.data_root) / p


def expand_env(text: str) -> str:
    """Expand $VAR, ${VAR} and ${VAR:-default} (the shell's forms)."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        value = os.environ.get(name)
        return value if value else (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", sub, text)


def resolve_data_root(yaml_root: str | None, override: str | None, yaml_path: Path) -> str:
    """The data root: evaluate.data_root, else the YAML's `data_root` (env vars expanded), else the YAML's dir.

    Relative roots resolve against the working directory (like run.run_dir), so the same YAML works from a
    checkout and from a Ray job's working_dir."""
    root = override or yaml_root
    if not root:
        return str(yaml_path.parent)
    root = os.path.expanduser(expand_env(root))
    return str(Path(root).resolve())


def _err(msg: str, key: str, source: Path | str) -> LocalTaskError:
    return LocalTaskError(msg, key, str(source))


def _k(key: str, sub: str) -> str:
    return f"{key}.{sub}" if key else sub


def _table(raw: Any, key: str, src: Path, task_format: dict, roles: tuple[set, set]) -> Table:
    if not isinstance(raw, dict):
        raise _err(f"expected a mapping with files and columns, got {raw!r}", key, src)
    unknown = sorted(set(raw) - _TABLE_KEYS)
    if unknown:
        raise _err(f"unknown key (known: {', '.join(sorted(_TABLE_KEYS))})", _k(key, str(unknown[0])), src)
    files = raw.get("files")
    if isinstance(files, str):
        files = [files]
    if not files or not all(isinstance(f, str) and f for f in files):
        raise _err("needs `files`: a file or a list of files", _k(key, "files"), src)
    cols = raw.get("columns")
    if not isinstance(cols, dict):
        raise _err("needs `columns`: a mapping from role to column name or 0-based index", _k(key, "columns"), src)
    need, optional = roles
    missing = sorted(need - set(cols))
    if missing:
        raise _err(f"missing column role {missing[0]!r} (needs {sorted(need)})", _k(key, "columns"), src)
    extra = sorted(set(cols) - need - optional)
    if extra:
        raise _err(f"unknown column role {extra[0]!r} (roles: {sorted(need | optional)})",
                   _k(key, f"columns.{extra[0]}"), src)
    for role, col in cols.items():
        if not (isinstance(col, str) and col) and not (isinstance(col, int) and not isinstance(col, bool)
                                                        and col >= 0):
            raise _err(f"expected a column name or a 0-based index, got {col!r}", _k(key, f"columns.{role}"), src)
    parse = raw.get("parse") or {}
    if not isinstance(parse, dict):
        raise _err("expected a mapping from role to parser", _k(key, "parse"), src)
    for role, how in parse.items():
        if role not in cols:
            raise _err(f"parses role {role!r}, which `columns` does not name", _k(key, f"parse.{role}"), src)
        if how not in PARSERS:
            raise _err(f"unknown parser {how!r} (known: {', '.join(PARSERS)})", _k(key, f"parse.{role}"), src)
    fmt = {**task_format, **_format(raw.get("format"), _k(key, "format"), src)}
    if fmt.get("header") is False and any(isinstance(c, str) for c in cols.values()) and not fmt.get("jsonl"):
        bad = next(r for r, c in cols.items() if isinstance(c, str))
        raise _err("names a column but the file has no header (header: false): use a 0-based index",
                   _k(key, f"columns.{bad}"), src)
    return Table(tuple(files), dict(cols), dict(parse), fmt, key)


def _format(raw: Any, key: str, src: Path) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _err(f"expected a mapping, got {raw!r}", key, src)
    unknown = sorted(set(raw) - _FORMAT_KEYS)
    if unknown:
        raise _err(f"unknown key (known: {', '.join(sorted(_FORMAT_KEYS))})", _k(key, str(unknown[0])), src)
    if "delimiter" in raw and (not isinstance(raw["delimiter"], str) or len(raw["delimiter"]) != 1):
        raise _err(f"must be one character, e.g. ',' or '\\t', got {raw['delimiter']!r}", _k(key, "delimiter"), src)
    if "quoting" in raw and raw["quoting"] not in ("csv", "none"):
        raise _err(f"must be 'csv' (quoted fields) or 'none' (quotes are text), got {raw['quoting']!r}",
                   _k(key, "quoting"), src)
    for b in ("header", "jsonl", "skip_bad_lines"):
        if b in raw and not isinstance(raw[b], bool):
            raise _err(f"expected true or false, got {raw[b]!r}", _k(key, b), src)
    return dict(raw)


def _beir_tables(raw: Any, split: str, src: Path, skip_bad_lines: bool = False) -> dict[str, Table]:
    """BEIR's layout: <dir>/corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv."""
    if not isinstance(raw, str) or not raw:
        raise _err("expected the BEIR dataset directory (holding corpus.jsonl, queries.jsonl, qrels/)", "beir", src)
    skip = {"skip_bad_lines": True} if skip_bad_lines else {}
    jl = {"jsonl": True, **skip}
    return {
        "corpus": Table((f"{raw}/corpus.jsonl",), {"id": "_id", "title": "title", "text": "text"}, {}, jl, "beir"),
        "queries": Table((f"{raw}/queries.jsonl",), {"id": "_id", "text": "text"}, {}, jl, "beir"),
        "qrels": Table((f"{raw}/qrels/{split}.tsv",), {"query_id": "query-id", "doc_id": "corpus-id",
                                                       "score": "score"}, {},
                       {"delimiter": "\t", "header": True, "quoting": "none", **skip}, "beir"),
    }


def load_spec(path: str | Path, data_root: str | None = None) -> LocalTaskSpec:
    """Read and validate a local task YAML; errors name the file and the key."""
    src = Path(path)
    if not src.exists():
        raise LocalTaskError(f"local task file not found: {src}")
    try:
        raw = yaml.safe_load(src.read_text())
    except yaml.YAMLError as e:
        raise LocalTaskError(f"not valid YAML: {e}", source=str(src)) from None
    if not isinstance(raw, dict):
        raise _err("top level must be a mapping", "", src)
    unknown = sorted(set(raw) - _TASK_KEYS)
    if unknown:
        raise _err(f"unknown key (known: {', '.join(sorted(_TASK_KEYS))})", unknown[0], src)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _err("needs a task `name` (e.g. STSBenchmark)", "name", src)
    ttype = raw.get("type")
    if ttype not in TASK_TYPES:
        raise _err(f"must be one of {list(TASK_TYPES)}, got {ttype!r}", "type", src)
    split = raw.get("split", "test")
    if not isinstance(split, str) or not split:
        raise _err(f"expected a split name, got {split!r}", "split", src)
    task_format = _format(raw.get("format"), "format", src)
    if "skip_bad_lines" in raw:     # shorthand for format.skip_bad_lines (a table's own format still wins)
        if not isinstance(raw["skip_bad_lines"], bool):
            raise _err(f"expected true or false, got {raw['skip_bad_lines']!r}", "skip_bad_lines", src)
        task_format.setdefault("skip_bad_lines", raw["skip_bad_lines"])
    root = raw.get("data_root")
    if root is not None and not isinstance(root, str):
        raise _err(f"expected a path, got {root!r}", "data_root", src)
    tables: dict[str, Table] = {}
    if ttype in ("sts", "pair_classification"):
        if "test" in raw:
            tables["test"] = _table(raw["test"], "test", src, task_format, ROLES[ttype])
        else:
            tables["test"] = _table({k: raw[k] for k in _TABLE_KEYS if k in raw}, "", src, task_format,
                                    ROLES[ttype])
    elif ttype == "classification":
        for part in ("train", "test"):
            if part not in raw:
                raise _err(f"classification needs a `{part}` table (files + columns)", part, src)
            tables[part] = _table(raw[part], part, src, task_format, ROLES["classification"])
    else:
        if "beir" in raw:
            tables = _beir_tables(raw["beir"], split, src, bool(task_format.get("skip_bad_lines")))
        else:
            for part in ("corpus", "queries"):
                if part not in raw:
                    raise _err(f"retrieval needs a `{part}` table (or `beir: <dir>`)", part, src)
                tables[part] = _table(raw[part], part, src, task_format, ROLES[part])
            if "qrels" in raw:
                tables["qrels"] = _table(raw["qrels"], "qrels", src, task_format, ROLES["qrels"])
            elif "relevant" not in tables["queries"].columns:
                raise _err("retrieval needs `qrels` (files + columns) or a `relevant` column in queries",
                           "qrels", src)
    sr = raw.get("score_range", [0, 5])
    if (not isinstance(sr, (list, tuple)) or len(sr) != 2 or not all(isinstance(v, (int, float)) for v in sr)
            or sr[0] >= sr[1]):
        raise _err(f"expected [min, max] with min < max, got {sr!r}", "score_range", src)
    ints = {}
    for k, default in (("n_experiments", 10), ("samples_per_label", 8), ("seed", 42)):
        v = raw.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "seed" else 1):
            raise _err(f"expected a positive integer, got {v!r}", k, src)
        ints[k] = v
    labels = raw.get("labels")
    if labels is not None and not (isinstance(labels, str) and labels) and not (
            isinstance(labels, list) and labels and all(isinstance(x, (str, int)) for x in labels)):
        raise _err(f"expected a list of labels or a JSON file holding one, got {labels!r}", "labels", src)
    instruction = raw.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise _err(f"expected a string, got {instruction!r}", "instruction", src)
    return LocalTaskSpec(
        name=name.strip(), type=ttype, source=str(src), data_root=resolve_data_root(root, data_root, src),
        split=split, description=str(raw.get("description") or f"Local {ttype} task {name} from {src.name}"),
        instruction=instruction, main_score=str(raw.get("main_score") or MAIN_SCORES[ttype]),
        score_range=(float(sr[0]), float(sr[1])), tables=tables,
        labels=tuple(str(x) for x in labels) if isinstance(labels, list) else labels, **ints)


# ---- reading files ---------------------------------------------------------------------------------

_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""", re.S)


def parse_quoted_strings(text: str) -> str:
    """A printed list of quoted strings (numpy/Python repr, not always valid Python) -> the strings joined by spaces."""
    parts = []
    for tok in _QUOTED.findall(text):
        try:
            parts.append(ast.literal_eval(tok))
        except (ValueError, SyntaxError):
            parts.append(tok[1:-1])
    if not parts:   # not a list after all: keep the text
        return text.strip()
    return " ".join(p.strip() for p in parts if p.strip())


def parse_id_list(text: str) -> list[str]:
    """'[1 2]', '[1, 2]', "['a', 'b']" or '1;2' -> ['1', '2'] (empty for '[]' or '')."""
    inner = text.strip().strip("[]()")
    return [t.strip().strip("'\"") for t in re.split(r"[\s,;]+", inner) if t.strip().strip("'\"")]


class _BadJSON(str):
    """A JSON-lines record that does not parse (the text is json's message)."""


def _json_rows(path: Path, enc: str):
    with path.open(encoding=enc) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, _BadJSON(str(e))


def _open_rows(path: Path, fmt: dict) -> tuple[list[str] | None, Any]:
    enc = fmt.get("encoding", "utf-8")
    if fmt.get("jsonl"):
        return None, _json_rows(path, enc)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    f = path.open(encoding=enc, newline="")
    delim = fmt.get("delimiter", "\t" if path.suffix in (".tsv", ".txt") else ",")
    quoting = csv.QUOTE_NONE if fmt.get("quoting", "csv") == "none" else csv.QUOTE_MINIMAL
    reader = csv.reader(f, delimiter=delim, quoting=quoting)
    header = None
    if fmt.get("header", True):
        header = next(reader, None) or []
        header = [h.strip().lstrip("\ufeff") for h in header]
    return header, ((reader.line_num, r) for r in reader)


def _is_number(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _row_problem(rec: Any, index: dict[str, int | str], table: Table, checks: str | None, where: str
                 ) -> tuple[str, str | None, dict[str, Any] | None]:
    """(what is wrong with the record, the role it is about, the row): an empty problem means a good row."""
    if isinstance(rec, _BadJSON):
        return f"{where}: not valid JSON ({rec})", None, None
    row: dict[str, Any] = {}
    for role, i in index.items():
        try:
            row[role] = rec[i]
        except (IndexError, KeyError, TypeError):
            size = f"the line has {len(rec)} fields" if isinstance(rec, list) else "the record has no such key"
            return f"{where}: {role} is missing (column {table.columns[role]!r}; {size})", role, None
    for role, how in table.parse.items():
        row[role] = parse_quoted_strings(row[role]) if how == "quoted_strings" else parse_id_list(str(row[role]))
    nonempty, numeric = ROW_CHECKS.get(checks or "", (frozenset(), frozenset()))
    for role in table.columns:
        value = row[role]
        if (role in nonempty or role in numeric) and (value is None or (isinstance(value, str) and not value.strip())):
            return f"{where}: {role} is empty (column {table.columns[role]!r})", role, None
        if role in numeric and not _is_number(value):
            return f"{where}: {role} {value!r} is not a number (column {table.columns[role]!r})", role, None
    return "", None, row


def read_table(table: Table, spec: LocalTaskSpec, checks: str | None = None,
               skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of {role: value} from the table's files.

    `checks` (a ROW_CHECKS key) names the roles a row needs non-empty and numeric. A bad line (too few fields,
    an empty text, a missing or non-numeric score, bad JSON) raises an error naming the file, line and column,
    or with the table's `skip_bad_lines` is left out and described in `skipped`.
    """
    rows: list[dict[str, Any]] = []
    key = table.key
    skip = bool(table.format.get("skip_bad_lines"))
    for rel in table.files:
        path = spec.path(rel)
        if not path.exists():
            raise LocalTaskError(f"data file not found: {path} (data_root {spec.data_root})", _k(key, "files"),
                                 spec.source)
        header, it = _open_rows(path, table.format)
        index: dict[str, int | str] = {}
        for role, col in table.columns.items():
            if isinstance(col, int) or header is None:
                index[role] = col
            elif col in header:
                index[role] = header.index(col)
            else:
                raise LocalTaskError(f"column {col!r} is not in {path.name}'s header {header}",
                                     _k(key, f"columns.{role}"), spec.source)
        for line, rec in it:
            if not rec or (isinstance(rec, list) and all(not c.strip() for c in rec)):
                continue
            where = f"{path}:{line}"
            problem, role, row = _row_problem(rec, index, table, checks, where)
            if problem:
                if skip:
                    if skipped is not None:
                        skipped.append(problem)
                    continue
                raise LocalTaskError(f"{problem}; {SKIP_HINT}", _k(key, f"columns.{role}" if role else "files"),
                                     spec.source)
            row["_where"] = where
            rows.append(row)
    return rows


def _number(row: dict, role: str, spec: LocalTaskSpec, key: str) -> float:
    try:
        return float(row[role])
    except (TypeError, ValueError):
        raise LocalTaskError(f"{row['_where']}: {role} {row[role]!r} is not a number", _k(key, f"columns.{role}"),
                             spec.source) from None


def subsample(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """Deterministic subset of row indices (kept in file order) for smoke tests."""
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), limit))


def read_task(spec: LocalTaskSpec, limit: int | None = None) -> dict[str, Any]:
    """The task's data as plain Python: the shapes `mteb_tasks.build_task` expects.

    sts / pair_classification: {"test": {"sentence1": [...], "sentence2": [...], "score"|"label": [...]}}
    classification: {"train": {"text", "label"}, "test": {"text", "label"}, "label_names": [...]} (label ids)
    retrieval: {"corpus": {id: {"title", "text"}}, "queries": {id: text}, "qrels": {qid: {doc_id: int}}}
    Each also has "skipped_lines": how many bad lines `skip_bad_lines` left out (before `limit`), and
    "skipped_examples": the first few of them, described (file:line: what is wrong).
    """
    skipped: list[str] = []
    data = _read_task(spec, limit, skipped)
    data["skipped_lines"] = len(skipped)
    data["skipped_examples"] = skipped[:5]
    if skipped:
        log.warning("local task %s: skipped %d bad line%s (skip_bad_lines), e.g. %s", spec.name, len(skipped),
                    "" if len(skipped) == 1 else "s", "; ".join(skipped[:3]))
    return data


def _read_task(spec: LocalTaskSpec, limit: int | None, skipped: list[str]) -> dict[str, Any]:
    if spec.type in ("sts", "pair_classification"):
        rows = read_table(spec.tables["test"], spec, spec.type, skipped)
        rows = [rows[i] for i in subsample(len(rows), limit, spec.seed)]
        out = {"sentence1": [str(r["sentence1"]) for r in rows], "sentence2": [str(r["sentence2"]) for r in rows]}
        if spec.type == "sts":
            out["score"] = [_number(r, "score", spec, spec.tables["test"].key) for r in rows]
        else:
            out["label"] = [int(_number(r, "label", spec, spec.tables["test"].key)) for r in rows]
        return {"test": out}
    if spec.type == "classification":
        out = {}
        for part in ("train", "test"):
            rows = read_table(spec.tables[part], spec, "classification", skipped)
            rows = [rows[i] for i in subsample(len(rows), limit, spec.seed)]
            out[part] = {"text": [str(r["text"]) for r in rows], "label": [str(r["label"]).strip() for r in rows],
                         "_where": [r["_where"] for r in rows]}
        names = _label_names(spec) or sorted(set(out["train"]["label"]) | set(out["test"]["label"]))
        ids = {n: i for i, n in enumerate(names)}
        for part in ("train", "test"):
            bad = next((w for w, lab in zip(out[part]["_where"], out[part]["label"]) if lab not in ids), None)
            if bad:
                raise LocalTaskError(f"{bad}: label is not in `labels`", "labels", spec.source)
            # Integer ids, as mteb's hub datasets have (sklearn's binary AP needs numeric labels).
            out[part] = {"text": out[part]["text"], "label": [ids[lab] for lab in out[part]["label"]]}
        out["label_names"] = names
        return out
    return _read_retrieval(spec, limit, skipped)


def _label_names(spec: LocalTaskSpec) -> list[str] | None:
    if spec.labels is None or isinstance(spec.labels, tuple):
        return list(spec.labels) if spec.labels else None
    path = spec.path(spec.labels)
    try:
        names = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LocalTaskError(f"cannot read the label list {path}: {e}", "labels", spec.source) from None
    if not isinstance(names, list):
        raise LocalTaskError(f"{path} must hold a JSON list of labels", "labels", spec.source)
    return [str(n).strip() for n in names]


def _read_retrieval(spec: LocalTaskSpec, limit: int | None, skipped: list[str]) -> dict[str, Any]:
    corpus: dict[str, dict[str, str]] = {}
    for r in read_table(spec.tables["corpus"], spec, "corpus", skipped):
        corpus.setdefault(str(r["id"]).strip(), {"title": str(r.get("title") or "").strip(),
                                                 "text": str(r["text"]).strip()})
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for r in read_table(spec.tables["queries"], spec, "queries", skipped):
        qid = str(r["id"]).strip()
        queries.setdefault(qid, str(r["text"]).strip())
        for d in r.get("relevant") or []:   # one row per (claim, evidence): relevant docs are the union
            qrels.setdefault(qid, {})[str(d)] = 1
    if "qrels" in spec.tables:
        for r in read_table(spec.tables["qrels"], spec, "qrels", skipped):
            score = int(_number(r, "score", spec, "qrels")) if "score" in r else 1
            qrels.setdefault(str(r["query_id"]).strip(), {})[str(r["doc_id"]).strip()] = score
    unknown = sorted({d for rel in qrels.values() for d in rel} - set(corpus))
    if unknown:
        raise LocalTaskError(f"{len(unknown)} relevant document ids are not in the corpus, e.g. {unknown[:3]}",
                             "qrels", spec.source)
    # Like mteb: only queries with at least one relevant document are evaluated.
    qids = [q for q in queries if any(s > 0 for s in qrels.get(q, {}).values())]
    if limit is not None and limit < len(qids):
        qids = [qids[i] for i in subsample(len(qids), limit, spec.seed)]
        keep = {d for q in qids for d in qrels[q]}
        others = [d for d in corpus if d not in keep]
        extra = max(0, 10 * limit - len(keep))   # same rule as mteb_tasks.limit_loaded_task
        keep |= {others[i] for i in subsample(len(others), extra, spec.seed)}
        corpus = {d: v for d, v in corpus.items() if d in keep}
    return {"corpus": corpus, "queries": {q: queries[q] for q in qids}, "qrels": {q: qrels[q] for q in qids}}
