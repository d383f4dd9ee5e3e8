"""The gateway's dashboard in a real headless browser (Debian's chromium, driven by Playwright): it asks
for a key, shows three live nodes with their traffic, starts its charts from the gateway's history when
opened, and shows a node going down."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import fill_store
from tests.e2e.node_process import GatewayProcess, NodeProcess


@contextlib.contextmanager
def fleet(root: Path, model_files: dict[str, Path]) -> Iterator[tuple[GatewayProcess, list[NodeProcess]]]:
    nodes = []
    for i in range(3):
        fill_store(root / f"node{i}" / "models", model_files)
        nodes.append(NodeProcess(root / f"node{i}"))
    config = root / "gateway.toml"
    config.write_text(
        "".join(f'[[nodes]]\nurl = "{n.url}"\nname = "n{i}"\n' for i, n in enumerate(nodes))
        + "[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nstatus_interval_s = 0.3\n"
    )
    gateway = GatewayProcess(root, "--config", str(config), auth=True)
    try:
        for node in nodes:
            node.start()
        gateway.start()
        yield gateway, nodes
    finally:
        gateway.stop()
        for node in nodes:
            node.stop()


@pytest.fixture
def page() -> Iterator[Page]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is missing: `make test` installs Debian's chromium package")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_the_dashboard_shows_the_fleet_and_a_node_going_down(
    page: Page, tmp_path: Path, model_files: dict[str, Path]
) -> None:
    problems: list[str] = []
    # Until the key is given, each poll's 401 is reported by the browser: expected, and nothing else is.
    page.on(
        "console", lambda m: problems.append(m.text) if m.type == "error" and "401" not in m.text else None
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    with fleet(tmp_path, model_files) as (gateway, nodes):
        response = page.goto(f"{gateway.url}/dashboard?interval=300")
        assert response is not None
        assert response.status == 200
        assert "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator("#login")).to_be_visible()  # the data needs an operator key
        page.fill("#key", gateway.admin_key)
        page.click("#login button")
        rows = page.locator("#nodes tbody tr")
        expect(rows).to_have_count(3)
        expect(page.locator('#nodes tr[data-state="up"]')).to_have_count(3)
        expect(page.locator("#summary")).to_contain_text("3 of 3 nodes taking traffic")
        with httpx.Client(headers=gateway.headers) as client:
            for _ in range(60):
                assert (
                    client.post(f"{gateway.url}/predict", json={"input_data": [1.0] * 64}).status_code == 200
                )
        for name in ("n0", "n1", "n2"):
            expect(page.locator(f'#latency-chart polyline[data-node="{name}"]')).to_have_count(1)
            row = page.locator(f'#nodes tr[data-node="{name}"]')
            expect(row.locator("td").nth(2)).not_to_have_text("–")  # its version, from its status
        # A page opened now, polling once a minute: its charts start from the gateway's history.
        page.goto(f"{gateway.url}/dashboard?interval=60000")
        for name in ("n0", "n1", "n2"):
            line = page.locator(f'#throughput-chart polyline[data-node="{name}"]')
            expect(line).to_have_count(1)
            assert len((line.get_attribute("points") or "").split()) >= 3
        page.goto(f"{gateway.url}/dashboard?interval=300")
        nodes[1].stop()
        expect(page.locator('#nodes tr[data-node="n1"]')).to_have_attribute(
            "data-state", "down", timeout=10_000
        )
        expect(page.locator('#nodes tr[data-state="up"]')).to_have_count(2)
        expect(page.locator("#summary")).to_contain_text("1 down")
    assert problems == []
