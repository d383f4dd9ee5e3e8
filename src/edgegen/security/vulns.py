"""The fleet scans itself for known-vulnerable packages, offline: OSV advisories imported from a file,
matched against what each node has installed.

    db = AdvisoryDb(home / "security" / "advisories.sqlite")
    db.import_file(Path("pypi-osv.zip"))            # an OSV export: .zip of records, or .json (one or a list)
    findings = db.scan([("jinja2", "3.1.2"), ...])   # Finding(package, version, advisory, fixed, summary)

Only the PyPI ecosystem is read. A version is affected when the record lists it, or when it falls in an
`ECOSYSTEM` range: at or after an `introduced` event and before the next `fixed` (or at or before a
`last_affected`), versions compared by PEP 440 (`packaging`). A version string PEP 440 cannot read is
never reported affected by a range (only by an exact listing), and said so in `unreadable`.
"""

from __future__ import annotations

import importlib.metadata
import sqlite3
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from edgegen.errors import ConfigError

MAX_RECORD_BYTES = 16 << 20
_SCHEMA = """
CREATE TABLE IF NOT EXISTS advisories (
    id TEXT NOT NULL,
    package TEXT NOT NULL,      -- canonical name
    summary TEXT NOT NULL,
    affected TEXT NOT NULL,     -- JSON: {"ranges": [[introduced, fixed, last], ...], "versions": [...]}
    PRIMARY KEY (id, package)
);
CREATE TABLE IF NOT EXISTS imports (ts REAL NOT NULL, source TEXT NOT NULL, records INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    advisory: str
    fixed: str | None
    summary: str


def installed_packages() -> list[tuple[str, str]]:
    """(canonical name, version) of every distribution this environment imports, sorted: where a name is
    installed twice (a software upgrade's environment before the base install's packages), the first
    on the path, the one imported."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"]:
            found.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return sorted(found.items())


def _spans(events: list[dict[str, str]]) -> list[list[str | None]]:
    """OSV range events in order → [introduced, fixed, last_affected] spans."""
    spans: list[list[str | None]] = []
    for event in events:
        if "introduced" in event:
            spans.append([event["introduced"], None, None])
        elif spans and "fixed" in event:
            spans[-1][1] = event["fixed"]
        elif spans and "last_affected" in event:
            spans[-1][2] = event["last_affected"]
    return spans


def _parse(record: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(id, package, summary, affected) for each PyPI package an OSV record names."""
    rows: list[tuple[str, str, str, dict[str, Any]]] = []
    advisory = str(record.get("id", ""))
    summary = str(record.get("summary") or record.get("details", ""))[:300]
    for affected in record.get("affected") or []:
        package = affected.get("package") or {}
        if package.get("ecosystem") != "PyPI" or not package.get("name") or not advisory:
            continue
        spans = []
        for entry in affected.get("ranges") or []:
            if entry.get("type") == "ECOSYSTEM":
                spans += _spans(entry.get("events") or [])
        versions = [str(v) for v in affected.get("versions") or []]
        rows.append(
            (advisory, canonicalize_name(package["name"]), summary, {"ranges": spans, "versions": versions})
        )
    return rows


def is_affected(version: str, affected: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether `version` is affected, and the first fixed version of the span that holds it.

    >>> is_affected("1.4", {"ranges": [["0", "1.5", None]], "versions": []})
    (True, '1.5')
    >>> is_affected("1.5", {"ranges": [["0", "1.5", None]], "versions": []})
    (False, None)
    """
    if version in affected["versions"]:
        return True, None
    try:
        current = Version(version)
    except InvalidVersion:
        return False, None
    for introduced, fixed, last in affected["ranges"]:
        try:
            if introduced not in (None, "0") and current < Version(introduced):
                continue
            if fixed is not None and current >= Version(fixed):
                continue
            if last is not None and current > Version(last):
                continue
        except InvalidVersion:
            continue
        return True, fixed
    return False, None


class AdvisoryDb:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def import_file(self, path: Path) -> int:
        """Import an OSV export (.zip of records) or a .json file (one record or a list); return how many
        package advisories it held. The whole file is imported or nothing."""
        try:
            records = list(self._records(path))
        except (OSError, zipfile.BadZipFile, orjson.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not an OSV file or export: {exc}") from None
        rows = [row for record in records if isinstance(record, dict) for row in _parse(record)]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO advisories (id, package, summary, affected) VALUES (?, ?, ?, ?)",
                [(a, p, s, orjson.dumps(x).decode()) for a, p, s, x in rows],
            )
            self._db.execute(
                "INSERT INTO imports (ts, source, records) VALUES (?, ?, ?)",
                (time.time(), path.name, len(rows)),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return len(rows)

    @staticmethod
    def _records(path: Path) -> Any:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    # Read members by name only, never extracted to disk; a member too big is refused.
                    if info.is_dir() or not info.filename.endswith(".json"):
                        continue
                    if info.file_size > MAX_RECORD_BYTES:
                        raise ConfigError(f"{path}: {info.filename} is larger than an advisory can be")
                    with archive.open(info) as member:
                        yield orjson.loads(member.read(MAX_RECORD_BYTES + 1))
            return
        data = orjson.loads(path.read_bytes())
        yield from (data if isinstance(data, list) else [data])

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM advisories").fetchone()[0])

    def last_import(self) -> float | None:
        row = self._db.execute("SELECT max(ts) FROM imports").fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def scan(self, packages: list[tuple[str, str]]) -> list[Finding]:
        findings = []
        for name, version in packages:
            package = canonicalize_name(name)
            rows = self._db.execute(
                "SELECT id, summary, affected FROM advisories WHERE package = ? ORDER BY id", (package,)
            ).fetchall()
            for advisory, summary, affected in rows:
                hit, fixed = is_affected(version, orjson.loads(affected))
                if hit:
                    findings.append(Finding(package, version, advisory, fixed, summary))
        return findings
