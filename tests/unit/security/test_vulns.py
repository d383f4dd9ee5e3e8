"""OSV advisories against installed versions: PEP 440 ranges, listings, imports whole or not at all."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from edgegen.errors import ConfigError
from edgegen.security.vulns import AdvisoryDb, installed_packages, is_affected


def record(advisory: str, package: str, events: list[dict[str, str]], versions: tuple[str, ...] = ()) -> dict:
    return {
        "id": advisory,
        "summary": f"{advisory} in {package}",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": package},
                "ranges": [{"type": "ECOSYSTEM", "events": events}],
                "versions": list(versions),
            }
        ],
    }


@pytest.mark.parametrize(
    ("version", "affected", "fixed"),
    [
        ("1.0", True, "1.5"),
        ("1.4.9", True, "1.5"),
        ("1.5", False, None),
        ("2.0", True, "2.2"),  # the second span
        ("2.2.0", False, None),
        ("0.9", False, None),  # before it was introduced
        ("3.1", True, None),  # at or before last_affected
        ("3.2", False, None),
        ("1.5rc1", True, "1.5"),  # a pre-release of the fix is still affected
        ("not-a-version", False, None),
    ],
)
def test_ranges(version: str, affected: bool, fixed: str | None) -> None:
    spans = {"ranges": [["1.0", "1.5", None], ["2.0", "2.2", None], ["3.0", None, "3.1"]], "versions": []}
    assert is_affected(version, spans) == (affected, fixed)


def test_a_listed_version_is_affected_even_when_unreadable() -> None:
    assert is_affected("weird-1", {"ranges": [], "versions": ["weird-1"]}) == (True, None)


def test_import_json_and_zip_then_scan(tmp_path: Path) -> None:
    db = AdvisoryDb(tmp_path / "advisories.sqlite")
    bundle = tmp_path / "osv.json"
    bundle.write_text(json.dumps([
        record("GHSA-1", "Jinja2", [{"introduced": "0"}, {"fixed": "3.1.3"}]),
        record("GHSA-2", "requests", [{"introduced": "2.0"}, {"fixed": "2.31.0"}]),
        {"id": "NPM-1", "affected": [{"package": {"ecosystem": "npm", "name": "jinja2"}, "ranges": []}]},
    ]))  # fmt: skip
    assert db.import_file(bundle) == 2
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("PYSEC-3.json", json.dumps(record("PYSEC-3", "jinja2", [{"introduced": "3.0"}])))
        out.writestr("README.txt", "not a record")
    assert db.import_file(archive) == 1
    findings = db.scan([("jinja2", "3.1.2"), ("requests", "2.31.0"), ("numpy", "2.0")])
    assert [(f.package, f.advisory, f.fixed) for f in findings] == [
        ("jinja2", "GHSA-1", "3.1.3"),
        ("jinja2", "PYSEC-3", None),
    ]
    assert db.count() == 3
    assert db.last_import() is not None


@pytest.mark.parametrize("content", [b"{not json", b"PK\x03\x04broken zip"])
def test_a_bad_file_imports_nothing(tmp_path: Path, content: bytes) -> None:
    db = AdvisoryDb(tmp_path / "advisories.sqlite")
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match="not an OSV"):
        db.import_file(bad)
    assert db.count() == 0


def test_installed_packages_are_canonical() -> None:
    found = dict(installed_packages())
    assert "pydantic-settings" in found
    assert all(name == name.lower() for name in found)
