"""`make audit`, dependency half: pip-audit over this environment, with an honest verdict.

pip-audit asks PyPI's JSON API for each installed package's known vulnerabilities. Where that service
cannot be reached (these build machines reach only the package index), pip-audit marks every package
"could not be audited" and finds nothing — which must not read as "no vulnerabilities". This script
runs it, counts what was really checked, and says which of three things happened:

    exit 0  every package checked, no known vulnerability
    exit 1  known vulnerabilities (listed, with the fixed versions pip-audit names)
    exit 0  nothing or not everything could be checked: said plainly, with the offline way out
            (`edgegen audit import` of an OSV bundle fetched elsewhere, then `edgegen audit`)
"""

from __future__ import annotations

import json
import subprocess  # nosec B404
import sys


def main() -> int:
    command = [sys.executable, "-m", "pip_audit", "--local", "--format", "json", "--progress-spinner", "off"]
    # A fixed argv list, no shell.
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # nosec B603
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(f"pip-audit failed to run: {done.stderr.strip()[-500:]}")
        return 1
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if "skip_reason" in d]
    vulnerable = [d for d in deps if d.get("vulns")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fixed version yet"
            print(f"VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    checked = len(deps) - len(skipped)
    if vulnerable:
        print(f"pip-audit: {len(vulnerable)} of {checked} checked packages have known vulnerabilities")
        return 1
    if skipped:
        reason = skipped[0]["skip_reason"]
        print(f"pip-audit: could NOT check {len(skipped)} of {len(deps)} packages: its vulnerability service")
        print(f"is not reachable from this machine (first reason: {reason}).")
        print(
            "This is not a clean bill of health; audit offline instead: fetch an OSV export elsewhere"
            " (osv-vulnerabilities PyPI/all.zip), then `edgegen audit import FILE` and `edgegen audit`."
        )
        return 0
    print(f"pip-audit: {checked} packages checked, no known vulnerabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
