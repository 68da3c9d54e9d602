"""deploy/grafana/actprm.json stays in step with the metrics: every metric a query names is
exported by daemon/metrics.py's registry on a real daemon process (tiny backbone, every role), and
the compose file provisions Grafana with it and a Prometheus that scrapes every role.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.paths import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "actprm.json"

# The metrics the lead's learning code adds (names fixed in issue 16). Until they are exported
# their check below skips; every other name must be exported now.
LEARNING = {"actprm_online_f1", "actprm_online_step_accuracy", "actprm_online_first_error_agreement",
            "actprm_online_window_labels", "actprm_heldout_f1", "actprm_online_f1_by_version",
            "actprm_labels_replayed_total"}
FUNCTIONS = {"rate", "irate", "increase", "delta", "sum", "max", "min", "avg", "count", "histogram_quantile",
             "clamp_min", "clamp_max", "abs", "topk", "bottomk", "label_values"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads. Raises on a function this test does not know
    (a typo would otherwise pass as a metric name that is never found)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors: [5m], [$__rate_interval]
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)  # label lists
    names = set()
    # A call: a name then "(", or an aggregation then its "by"/"without" (sum by (le) (...)).
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\(|(?:by|without)\b)?", e):
        word, call = m.group(1), m.group(2)
        if word in KEYWORDS:
            continue
        if call:
            if word not in FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        else:
            names.add(word)
    return names


def test_metric_names_parser():
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(actprm_swap_seconds_bucket{service=~"$service"}[$__rate_interval])))') \
        == {"actprm_swap_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / ignoring(le) group_left sum(rate(b_count[1h]))") == {"a_total", "b_count"}
    assert metric_names('max by (version) (x{le=~"0.1|0.5"}) > bool 0.5') == {"x"}
    with pytest.raises(ValueError, match="raet"):
        metric_names("raet(x[5m])")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable."""
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
            assert m, f"variable {v['name']}: only label_values(metric, label) is checked here, got {q!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def _queried() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for where, expr in _queries(_dashboard()):
        for n in metric_names(expr):
            names.setdefault(n, []).append(where)
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Sample names on a real daemon process's /metrics page after one of each observation."""
    from actprm.daemon.metrics import Metrics, start_metrics
    from actprm.daemon.settings import Settings
    from support.roles import memory_process

    settings = Settings(state_dir=tmp_path_factory.mktemp("dash"), model={"backbone": "tiny", "n_heads": 4, "max_length": 256},
                        metrics={"port": 0})
    rt, _ = memory_process(settings, metrics=Metrics())
    try:
        assert asyncio.run(start_metrics(rt)) is None  # port 0: no server, the Metrics is attached
        m = rt.metrics
        m.observe_scores([[0.9, 0.2]])
        m.observe_judge(1.5, ok=True)
        m.observe_swap(0.05)
        m.observe_agreement(1, 1, confident=True)
        # Two labels as prequential tests of version 0 (one with an error, one without), so the
        # online figures have values to export.
        from actprm.model.eval.prequential import score_label

        rt.trainer.online.add(score_label([0.9, 0.2], 1, 2, version=0))
        rt.trainer.online.add(score_label([0.9, 0.8], -1, 2, version=0))
        for test in list(rt.trainer.online.tests):  # and as labels of the stream's validation sample
            rt.trainer.sample.add(test)
        # What daemon/run.py's held-out evaluation leaves on the process after scoring a version.
        rt.heldout = {"version": 0, "f1": 0.5, "acc_error": 0.5, "acc_correct": 0.5}
        text = m.exposition().decode()
    finally:
        rt.close()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_is_well_formed():
    dash = _dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] == "actprm"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    names = _queried()
    assert all(n.startswith("actprm_") for n in names), sorted(n for n in names if not n.startswith("actprm_"))
    # What the issue asks the dashboard to show.
    for wanted in ("actprm_scored_total", "actprm_selected_total", "actprm_judged_total", "actprm_budget_left",
                   "actprm_judge_latency_seconds_bucket", "actprm_swap_seconds_bucket", "actprm_sends_held",
                   "actprm_online_f1_by_version"):
        assert wanted in names, wanted


def test_every_metric_the_dashboard_queries_is_exported(exported):
    missing = {n: where for n, where in _queried().items() if n not in LEARNING and n not in exported}
    assert not missing, f"queried but not exported: {missing}"


def test_the_learning_metrics_the_dashboard_queries_are_exported(exported):
    queried = {n for n in _queried() if n in LEARNING}
    if not queried & exported:
        pytest.skip(reason="the learning metrics (actprm_online_f1 ...) are not exported yet: the lead's learning code has not landed")
    assert queried <= exported, f"queried but not exported: {sorted(queried - exported)}"


def test_compose_provisions_grafana_and_prometheus_scrapes_every_role():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]

    def mounts(svc: dict) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}

    g = mounts(grafana)
    assert (DEPLOY / g["/etc/grafana/provisioning"]).resolve() == (DEPLOY / "grafana" / "provisioning").resolve()
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/actprm.yml").read_text())["providers"][0]
    folder = provider["options"]["path"]
    assert (DEPLOY / g[f"{folder}/actprm.json"]).resolve() == DASHBOARD.resolve()
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["isDefault"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()
    assert host == "prometheus" and f"{port}:{port}" in prometheus["ports"][0]

    p = mounts(prometheus)
    config = yaml.safe_load((DEPLOY / p["/etc/prometheus/prometheus.yml"]).read_text())
    sd = config["scrape_configs"][0]["dns_sd_configs"][0]
    metrics_port = int(compose["x-actprm-env"]["ACTPRM_METRICS__PORT"])
    assert set(sd["names"]) == {"scorer", "judge", "trainer"} and sd["port"] == metrics_port
    # The dashboard's `service` variable is the label this relabelling sets.
    relabel = config["scrape_configs"][0]["relabel_configs"][0]
    assert relabel == {"source_labels": ["__meta_dns_name"], "target_label": "service"}
    assert grafana["profiles"] == prometheus["profiles"] == ["monitoring"]
