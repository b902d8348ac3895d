"""deploy/grafana/prefixgate.json and docs/metrics.md against what a running gateway and engine worker
really export on /metrics: every metric the dashboard queries exists, every exported metric is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana" / "prefixgate.json"
DOCS = ROOT / "docs" / "metrics.md"
METRIC_NAME = re.compile(r"\b(prefixgate_[a-z0-9_]+)\b")


def grafana_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return queries


async def scrape(s: aiohttp.ClientSession, url: str) -> list:
    async with s.get(url + "/metrics") as r:
        assert r.status == 200
        return list(text_string_to_metric_families(await r.text()))


def test_grafana_dashboard_is_well_formed() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(
            t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"]
        )


@pytest.mark.slow  # real engine workers
async def test_grafana_and_docs_match_the_exported_metrics(two_workers, gateway) -> None:
    async with gateway(two_workers) as (base, _), aiohttp.ClientSession() as s:
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "stream": True}
        async with s.post(base + "/v1/chat/completions", json=body) as r:  # labelled series appear on use
            assert r.status == 200
            await r.read()
        families = await scrape(s, base) + await scrape(s, two_workers[0])

    exported = {sample.name for family in families for sample in family.samples}
    index_size = {
        sample.labels["kind"]: sample.value
        for family in families
        for sample in family.samples
        if sample.name == "prefixgate_index_size"
    }
    assert index_size["blocks"] > 0, "the routed prompt's blocks are not in the exported index size"
    referenced = {
        name for q in grafana_queries(json.loads(GRAFANA.read_text())) for name in METRIC_NAME.findall(q)
    }
    assert referenced, "the dashboard queries no prefixgate metric"
    assert not referenced - exported, (
        f"the Grafana dashboard queries metrics nobody exports: {referenced - exported}"
    )

    docs = DOCS.read_text()
    for family in families:
        if not family.name.startswith("prefixgate") or family.name.endswith("_created"):
            continue  # the text parser shows each counter's _created timestamp as a gauge of its own
        shown = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"`{shown}`" in docs, f"{shown} ({family.type}) is missing from docs/metrics.md"
