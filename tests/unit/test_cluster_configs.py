"""The cluster files, validated offline the way Ray itself reads them.

- ``ray-cluster.yaml``: Ray's cluster launcher preparation (defaults of the provider
  filled in) and schema validation (``ray.autoscaler._private.util``).
- ``deploy/k8s/raycluster.yaml``: Ray's own KubeRay translation of a RayCluster into the
  autoscaler's configuration (``_derive_autoscaling_config_from_ray_cr``, which validates
  the result against the same schema).
- ``deploy/k8s/configmap.yaml``: every entry is a valid ``AUTOMAT_*`` setting.
- ``Dockerfile``: copies what exists, runs the ``automat`` console script.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(REPO / "ray-cluster.yaml")
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head"
    assert types["head"]["resources"]["CPU"] == 0 and types["head"]["max_workers"] == 0
    assert types["head"]["resources"]["automat_control"] > 0  # control actors stay on the head
    assert "automat_control" not in types["mail_worker"]["resources"]
    worker = types["mail_worker"]
    assert worker["resources"]["mail_worker"] == 1 and worker["resources"]["CPU"] >= 2
    assert 1 <= worker["min_workers"] < worker["max_workers"] <= cfg["max_workers"]
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in head_cmd and "--autoscaling-config" in head_cmd
    # secrets are mounted and named, never written into the file
    assert not re.search(r"(password|token)\s*[:=]\s*\S", (REPO / "ray-cluster.yaml").read_text(), re.I)


def test_a_broken_cluster_yaml_is_refused_by_the_same_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(REPO / "ray-cluster.yaml")
    raw["available_node_types"]["mail_worker"]["max_wrokers"] = 3  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


def test_raycluster_translates_through_rays_kuberay_autoscaler_config():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = load(K8S / "raycluster.yaml")
    assert cr["kind"] == "RayCluster" and cr["spec"]["enableInTreeAutoscaling"] is True
    auto = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))  # validates against Ray's schema
    types = auto["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0  # num-cpus: 0 on the head
    assert types["headgroup"]["resources"]["automat_control"] == 1000
    w = types["mail-workers"]
    assert w["resources"]["CPU"] == 4 and w["resources"]["mail_worker"] == 1
    assert (w["min_workers"], w["max_workers"]) == (2, 12)
    assert auto["idle_timeout_minutes"] == 10
    assert cr["spec"]["rayVersion"] == __import__("ray").__version__


def test_configmap_is_a_valid_automat_configuration(monkeypatch):
    from actors.runtime.config import load_config

    cm = load(K8S / "configmap.yaml")
    for k in list(__import__("os").environ):
        if k.startswith("AUTOMAT_"):
            monkeypatch.delenv(k)
    for k, v in cm["data"].items():
        assert k.startswith("AUTOMAT_"), k
        monkeypatch.setenv(k, v)
    cfg = load_config()
    assert cfg.local_stack is False and cfg.redis.url.startswith("rediss://")
    assert cfg.kafka.security_protocol == "SASL_SSL" and str(cfg.kafka.sasl_password_file).startswith("/run/secrets/")
    assert all(str(m.password_file).startswith("/run/secrets/") and m.password is None for m in cfg.kim.mailboxes)
    assert {p.kind for p in cfg.autoscale.pools} == {"kim.worker", "kim.slip"}
    assert cfg.runtime.host_scheduling == "SPREAD" and cfg.runtime.host_num_cpus == 1
    head = load(K8S / "raycluster.yaml")["spec"]["headGroupSpec"]["rayStartParams"]["resources"]
    assert cfg.runtime.control_resource in head
    # every file a setting points at is in the secret (by name)
    secret = load(K8S / "secret.example.yaml")
    files = {f"/run/secrets/{name}" for name in secret["stringData"]}
    referenced = {v for k, v in cm["data"].items() if k.endswith("_FILE")}
    referenced |= {str(m.password_file) for m in cfg.kim.mailboxes}
    assert referenced <= files, referenced - files


def test_every_k8s_manifest_parses_and_mounts_the_secret_read_only():
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(K8S.glob("*.yaml"))}
    assert {"raycluster.yaml", "configmap.yaml", "secret.example.yaml", "blobs-pvc.yaml", "app-job.yaml"} <= set(docs)
    cr = docs["raycluster.yaml"][0]
    pods = [cr["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cr["spec"]["workerGroupSpecs"]]
    for pod in pods:
        c = pod["containers"][0]
        assert {"name": "secrets", "mountPath": "/run/secrets", "readOnly": True} in c["volumeMounts"]
        assert {"configMapRef": {"name": "automat-config"}} in c["envFrom"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"]


def test_dockerfile_copies_what_exists_and_runs_the_console_script():
    text = (REPO / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        if not src.startswith("--"):
            assert (REPO / src).exists(), src
    assert '"automat"' in text and 'automat = "deploy.cli:main"' in (REPO / "pyproject.toml").read_text()
    assert "USER ray" in text  # not root


def test_control_actors_are_pinned_to_the_head_when_configured():
    from actors.runtime.config import load_config
    from deploy.app import root_spec
    from supervisors.spec import SupervisorSpec

    cfg = load_config()
    assert all("resources" not in spec.options for _, spec in root_spec(cfg).walk())  # local: nothing pinned
    cfg.runtime.control_resource = "automat_control"
    for path, spec in root_spec(cfg).walk():
        pinned = spec.options.get("resources", {}).get("automat_control", 0) > 0
        if isinstance(spec, SupervisorSpec) or path.endswith(("autoscaler", "outbox.relay")):
            assert pinned, path
        if ".host." in path:  # shard hosts go where the CPUs are
            assert not pinned, path


def test_shard_hosts_report_no_ray_task_events_unless_asked():
    """The hosts' batch calls (thousands a second) are not reported to the GCS as task
    events by default - it grew by 170 MiB in a 30,000-mail load test; an operator who
    wants them in the dashboard's task list sets ``runtime.host_task_events``."""
    from actors.runtime.config import load_config
    from actors.runtime.system import host_actor_options
    from actors.kim.app import kinds

    cfg = load_config()
    for kind in kinds(cfg):
        assert host_actor_options(kind, cfg)["enable_task_events"] is False
    cfg.runtime.host_task_events = True
    assert all(host_actor_options(k, cfg)["enable_task_events"] is True for k in kinds(cfg))
