"""deploy/monitoring: the alert rules (plain file and PrometheusRule) pass
``promtool check rules`` and their ``promtool test rules`` unit tests, the example
Prometheus config passes ``promtool check config``, the Grafana dashboard is well formed
and importable with any Prometheus data source, the Kubernetes objects are valid, and
every metric the rules and the dashboard use is one that the agent really exports (read
from a ``/metrics`` answer of the agent app over the stateful fakes, after a plan was
applied, so that every counter has series)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.http.apphelpers import BOTH, CLEAN, READ, auth, build
from tests.deploy.conftest import REPO, require_tool

MONITORING = REPO / "deploy" / "monitoring"
RULES_FILE = MONITORING / "nas-janitor.rules.yml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "nas-janitor-dashboard.json"
SERVICEMONITOR_DIR = MONITORING / "servicemonitor"
PROMETHEUS_EXAMPLE = MONITORING / "prometheus.example.yml"
RULE_TESTS = Path(__file__).resolve().parent / "monitoring" / "rules.test.yml"
JOB = "nas-janitor-agent"

# Series that Prometheus itself makes for every target: the only names a query may use
# that the agent does not export.
PROMETHEUS_SERIES = frozenset({"up"})


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "run `make deps`: Debian's prometheus package")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def prometheus_rule_groups() -> list[dict[str, Any]]:
    doc = load_yaml(PROMETHEUS_RULE)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    groups: list[dict[str, Any]] = doc["spec"]["groups"]
    return groups


def rule_files(tmp_path: Path) -> dict[str, Path]:
    """The plain rules file, and the rules inside the PrometheusRule as a rules file."""
    extracted = tmp_path / "from-prometheusrule.rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": prometheus_rule_groups()}, sort_keys=False))
    return {"plain": RULES_FILE, "prometheusrule": extracted}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)
    print(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    return proc


def rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(RULES_FILE)["groups"] for r in g["rules"]]


# --- promtool -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "prometheusrule"])
def test_promtool_check_rules(promtool: str, tmp_path: Path, which: str) -> None:
    path = rule_files(tmp_path)[which]
    proc = run(promtool, "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


@pytest.mark.parametrize("which", ["plain", "prometheusrule"])
def test_promtool_rule_unit_tests(promtool: str, tmp_path: Path, which: str) -> None:
    """Every alert fires on its series when its ``for`` says, and not before."""
    spec = load_yaml(RULE_TESTS)
    assert [Path(p).name for p in spec["rule_files"]] == [RULES_FILE.name]
    tested = {t["alertname"] for case in spec["tests"] for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for r in rules()}, "each alert has a unit test"
    spec["rule_files"] = [str(rule_files(tmp_path)[which])]
    test_file = tmp_path / "rules.test.yml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = run(promtool, "test", "rules", str(test_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_fails_on_a_broken_rule_and_a_wrong_expectation(
    promtool: str, tmp_path: Path
) -> None:
    """The checks above can fail: a syntax error, and an alert expected too early."""
    groups = load_yaml(RULES_FILE)
    groups["groups"][0]["rules"][0]["expr"] = "up{job=} == 0"
    broken = tmp_path / "broken.rules.yml"
    broken.write_text(yaml.safe_dump(groups))
    assert run(promtool, "check", "rules", str(broken)).returncode != 0

    spec = load_yaml(RULE_TESTS)
    spec["rule_files"] = [str(RULES_FILE)]
    first = spec["tests"][0]["alert_rule_test"]
    first[0]["exp_alerts"] = copy.deepcopy(first[1]["exp_alerts"])  # "down" at 11m: too soon
    wrong = tmp_path / "wrong.test.yml"
    wrong.write_text(yaml.safe_dump(spec))
    assert run(promtool, "test", "rules", str(wrong)).returncode != 0


def test_prometheus_example_config(promtool: str, tmp_path: Path) -> None:
    shutil.copy(PROMETHEUS_EXAMPLE, tmp_path / "prometheus.yml")
    shutil.copy(RULES_FILE, tmp_path / RULES_FILE.name)
    (tmp_path / "nas-janitor-ca.pem").write_text("")  # promtool checks that they exist
    (tmp_path / "nas-janitor-metrics.token").write_text("")
    proc = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = load_yaml(PROMETHEUS_EXAMPLE)
    assert config["rule_files"] == [RULES_FILE.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB and job["scheme"] == "https"


def test_the_prometheusrule_holds_the_plain_files_groups() -> None:
    assert prometheus_rule_groups() == load_yaml(RULES_FILE)["groups"]


def test_every_rule_is_an_alert_about_the_agents_job() -> None:
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
        assert f'job="{JOB}"' in rule["expr"], rule["alert"]
    # deploy/monitoring/README.md patches it by its index
    assert rules()[6]["alert"] == "NasJanitorReclaimableBytesHigh"


# --- the metrics the rules and the dashboard use ---------------------------------------

_GRAFANA_INTERVAL = re.compile(
    r"\$(?:\{__(?:rate_interval|interval|range)\}|__(?:rate_interval|interval|range)\b)"
)
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<query>.+),\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus would get it: Grafana's range variables become a
    duration, the dashboard's own variables a regex that matches anything."""
    expr = _GRAFANA_INTERVAL.sub("5m", expr)
    return _GRAFANA_VARIABLE.sub(".*", expr)


def variables_used(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _GRAFANA_VARIABLE.finditer(expr)} - {
        "__rate_interval",
        "__interval",
        "__range",
    }


def metric_names(promql: str) -> set[str]:
    """The metric names that a PromQL expression selects, from its syntax tree (a name
    may also be given as a ``__name__`` matcher)."""
    tree = promql_parser.parse(promql)
    names: set[str] = set()
    problems: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    if m.op == promql_parser.MatchOp.Equal:
                        names.add(m.value)
                    else:
                        problems.append(f"{promql}: __name__ {m.op} {m.value!r} is not checked")
        return True

    promql_parser.walk(tree, visit)
    assert not problems, problems
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of every query variable."""
    found = []
    for panel in panels(dash):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(query)
        assert m, f"variable {var['name']}: only label_values(...) queries are expected"
        if m["query"]:
            found.append((f"variable {var['name']}", m["query"]))
    return found


def exported_names() -> set[str]:
    """Every sample name in a real ``/metrics`` answer of the agent app, after a plan
    applied (actions, jobs, reclaimed bytes), an audit check and a few requests."""
    with tempfile.TemporaryDirectory() as d:
        agent = build(Path(d))
        plan = agent.client.post("/v1/plans", json={"min_age_seconds": 0}, headers=auth(CLEAN))
        assert plan.status_code == 201
        job = agent.client.post(f"/v1/plans/{plan.get_json()['id']}/apply", headers=auth(CLEAN))
        assert job.status_code == 202
        agent.wait_job(job.get_json()["job_id"])
        assert agent.get(f"/v1/jobs/{job.get_json()['job_id']}").get_json()["state"] == (
            "succeeded"
        )
        assert agent.get("/v1/audit/verify", token=BOTH).status_code == 200
        r = agent.get("/metrics", token=READ)
        assert r.status_code == 200
        text = r.get_data(as_text=True)
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_the_metric_name_parser_sees_through_functions_and_suffixes() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(a_seconds_bucket{x=~".*"}[5m])))'
        ' / on() group_left sum(increase(b_total[1d] offset 1h)) or absent({__name__="c"})'
        " unless max_over_time(d[1h:5m])"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d"}
    assert metric_names(grafana_to_promql('sum(rate(e{i=~"$instance"}[$__rate_interval]))')) == {
        "e"
    }
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(x[5m])")


def test_every_metric_the_rules_and_the_dashboard_use_is_exported() -> None:
    exported = exported_names()
    # What a scrape must hold for the rules and the dashboard to mean anything.
    assert {"nas_janitor_findings", "nas_janitor_jobs_finished_total"} <= exported
    assert "nas_janitor_http_request_seconds_bucket" in exported

    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {rule['alert']}")
    for where, expr in dashboard_queries(dashboard()):
        names = metric_names(grafana_to_promql(expr))
        assert names, f"{where} selects no metric: {expr}"
        for name in names:
            used.setdefault(name, set()).add(where)

    unknown = {n: sorted(w) for n, w in used.items() if n not in exported | PROMETHEUS_SERIES}
    assert not unknown, f"not exported by the agent: {unknown}"
    # the agent's own metrics all appear somewhere (the _created series aside)
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    ours = {re.sub(r"_(total|created)$", "", n) for n in exported if not n.endswith("_created")}
    ours = {re.sub(r"_(bucket|count|sum)$", "", n) for n in ours}
    assert ours <= families, f"exported but shown nowhere: {sorted(ours - families)}"


def test_a_misspelt_metric_would_be_caught() -> None:
    exported = exported_names()
    assert metric_names("nas_janitor_jobs_finished{state='failed'}") - exported == {
        "nas_janitor_jobs_finished"  # a counter's samples end in _total
    }
    assert metric_names("rate(nas_janitor_http_request_seconds[5m])") - exported == {
        "nas_janitor_http_request_seconds"  # a histogram has _bucket, _sum, _count
    }


# --- the dashboard --------------------------------------------------------------------

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = frozenset({"row", "stat", "timeseries", "table", "gauge", "bargauge", "text"})


def dashboard_problems(dash: dict[str, Any]) -> list[str]:
    """What would stop an import, or leave a panel without data, in a dashboard."""
    problems = []
    for key, kind in (("uid", str), ("title", str), ("panels", list), ("schemaVersion", int)):
        if not isinstance(dash.get(key), kind):
            problems.append(f"{key} missing or not a {kind.__name__}")
    if dash.get("id") is not None:
        problems.append("id must be null, so that an import makes a new dashboard")
    uid = dash.get("uid", "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
        problems.append(f"uid {uid!r}: at most 40 letters, digits, - or _")
    if "__inputs" in dash or "${DS_" in json.dumps(dash):
        problems.append("use the datasource variable, not import-time inputs")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = [v for v in variables.values() if v["type"] == "datasource"]
    if len(ds) != 1 or ds[0]["name"] != "datasource" or ds[0]["query"] != "prometheus":
        problems.append("one datasource variable named datasource, of type prometheus")

    def refs(node: Any, where: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "datasource":
                    yield where, v
                else:
                    yield from refs(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from refs(v, f"{where}[{i}]")

    for where, ref in refs({k: v for k, v in dash.items() if k != "annotations"}, "$"):
        if ref != DATASOURCE_REF:
            problems.append(f"{where}: datasource {ref!r} is not the datasource variable")

    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dash):
        title = panel.get("title", "?")
        if panel.get("type") not in PANEL_TYPES:
            problems.append(f"panel {title!r}: unknown type {panel.get('type')!r}")
        if not isinstance(panel.get("id"), int) or panel["id"] in ids:
            problems.append(f"panel {title!r}: id missing or not unique")
        else:
            ids.add(panel["id"])
        pos = panel.get("gridPos", {})
        x, y, w, h = (pos.get(k) for k in ("x", "y", "w", "h"))
        if not all(isinstance(v, int) for v in (x, y, w, h)):
            problems.append(f"panel {title!r}: gridPos needs integer x, y, w, h")
            continue
        assert isinstance(x, int) and isinstance(y, int) and isinstance(w, int)
        assert isinstance(h, int)
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > 24:
            problems.append(f"panel {title!r}: gridPos {pos} is off the 24-column grid")
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                other = cells.setdefault((cx, cy), title)
                if other != title:
                    problems.append(f"panel {title!r} overlaps {other!r}")
                    break
            else:
                continue
            break
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no query")
        refids = [t.get("refId") for t in targets]
        if len(set(refids)) != len(refids) or not all(refids):
            problems.append(f"panel {title!r}: refIds missing or repeated")
        for t in targets:
            if not t.get("expr"):
                problems.append(f"panel {title!r}: a target without expr")
            for name in variables_used(t.get("expr", "")):
                if name not in variables:
                    problems.append(f"panel {title!r}: ${name} is not a dashboard variable")
    return problems


def test_the_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dashboard_problems(dash) == []
    assert len(list(panels(dash))) >= 10
    for _where, expr in dashboard_queries(dash):
        promql_parser.parse(grafana_to_promql(expr))  # raises on a syntax error, naming it


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (lambda d: d["panels"][1]["gridPos"].update(x=0), "overlaps"),
        (lambda d: d["panels"][0].update(datasource={"uid": "P1809F7CD0C75ACF3"}), "datasource"),
        (lambda d: d["panels"][0]["targets"][0].update(expr="up{x=~'$nope'}"), "$nope"),
        (lambda d: d["panels"][2].update(id=d["panels"][0]["id"]), "not unique"),
        (lambda d: d["panels"][0]["gridPos"].update(w=30), "24-column"),
        (lambda d: d.update(id=7), "id must be null"),
        (lambda d: d["templating"]["list"].pop(0), "datasource variable"),
    ],
)
def test_the_dashboard_check_finds_breakage(breakage: Any, problem: str) -> None:
    dash = dashboard()
    breakage(dash)
    assert any(problem in p for p in dashboard_problems(dash)), dashboard_problems(dash)


# --- Kubernetes objects ---------------------------------------------------------------


def objects(folder: Path) -> list[dict[str, Any]]:
    kust = load_yaml(folder / "kustomization.yaml")
    assert kust["kind"] == "Kustomization" and kust["namespace"] == "nas-janitor"
    found = []
    for name in kust.get("resources", []):
        assert (folder / name).is_file(), f"{folder.name}/kustomization.yaml names {name}"
        found += [d for d in yaml.safe_load_all((folder / name).read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        for name in gen["files"]:
            assert (folder / name).is_file(), f"configMapGenerator names {name}"
    for doc in found:
        assert doc["metadata"]["namespace"] == kust["namespace"]
    return found


def test_the_monitoring_kustomization() -> None:
    (rule,) = objects(MONITORING)
    assert rule["kind"] == "PrometheusRule"
    (gen,) = load_yaml(MONITORING / "kustomization.yaml")["configMapGenerator"]
    assert gen["files"] == [DASHBOARD.name]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}  # the sidecar's label


def test_the_servicemonitor_scrapes_the_agents_service() -> None:
    docs = {d["kind"]: d for d in objects(SERVICEMONITOR_DIR)}
    assert set(docs) == {"Service", "Endpoints", "ServiceMonitor"}
    for kind in ("Service", "Endpoints"):
        for version in ("1.27.0", latest_version()):
            kubernetes_validate.validate(docs[kind], version, strict=True)
    service, endpoints, monitor = docs["Service"], docs["Endpoints"], docs["ServiceMonitor"]
    assert service["metadata"]["name"] == endpoints["metadata"]["name"] == JOB  # the job label
    assert "selector" not in service["spec"]  # the agents are outside the cluster
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (ep,) = monitor["spec"]["endpoints"]
    assert set(ep) <= {
        "port", "scheme", "path", "interval", "scrapeTimeout", "tlsConfig", "authorization",
        "relabelings",
    }  # fmt: skip
    assert ep["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert ep["port"] in {p["name"] for s in endpoints["subsets"] for p in s["ports"]}
    assert ep["scheme"] == "https" and ep["path"] == "/metrics"
    assert ep["authorization"]["type"] == "Bearer"
    assert ep["tlsConfig"]["ca"]["secret"]["name"] == ep["authorization"]["credentials"]["name"]
