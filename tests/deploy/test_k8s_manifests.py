"""deploy/k8s: every manifest is valid against the Kubernetes schemas (bundled with
kubernetes-validate, offline), the kustomization names them all, the CronJob has the
settings a nightly cleaner needs, and its command line is one the real ``janitorctl``
accepts, with a fleet file that the real fleet loader loads. The store is on a
PersistentVolumeClaim (k3s's local-path; the storage-class overlay patches it), and the
tokens Secret is mounted so that uid 10001 can read it and janitorctl's rule for secret
files holds. (Runs sharing that store: test_k8s_history.py.)"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from controller import cli as controller_cli
from controller.client import token_from_file
from controller.errors import ConfigError
from controller.fleet import load_fleet
from tests.deploy.conftest import K8S_DIR, REPO, missing_prerequisite

# The oldest Kubernetes the manifests claim (CronJob.spec.timeZone is GA in 1.27), and
# the newest whose schemas kubernetes-validate carries.
K8S_VERSIONS = ("1.27.0", latest_version())

CONTROLLER_UID = 10001


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} holds no document"
    return docs


def all_objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in documents(path)]


def the_object(kind: str) -> dict[str, Any]:
    found = [d for d in all_objects() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def cronjob_container() -> dict[str, Any]:
    pod = the_object("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    containers = pod["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def test_there_are_manifests() -> None:
    kinds = {d["kind"] for d in all_objects()}
    assert {
        "Namespace", "ServiceAccount", "ConfigMap", "Secret", "PersistentVolumeClaim", "CronJob",
    } <= kinds  # fmt: skip


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schema(path: Path, version: str) -> None:
    for doc in documents(path):
        # strict: unknown fields (a typo in a key) are errors too.
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_broken_cronjob() -> None:
    """The schemas really are checked: a misspelt field and a wrong type both fail."""
    good = the_object("CronJob")
    typo = yaml.safe_load(yaml.safe_dump(good))
    typo["spec"]["concurencyPolicy"] = typo["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, latest_version(), strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(good))
    wrong_type["spec"]["successfulJobsHistoryLimit"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, latest_version(), strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    resources = k["resources"]
    for name in resources:
        assert (K8S_DIR / name).is_file(), f"kustomization names a missing file: {name}"
    expected = {p.name for p in manifest_files() if not p.name.endswith(".example.yaml")}
    assert set(resources) == expected
    assert "secret.example.yaml" not in resources  # real tokens never come from git


def test_every_object_is_in_the_kustomization_namespace() -> None:
    namespace = kustomization()["namespace"]
    assert the_object("Namespace")["metadata"]["name"] == namespace
    for doc in all_objects():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]


def test_kustomization_image_matches_the_cronjob_and_the_project_version() -> None:
    image = cronjob_container()["image"]
    name, _, tag = image.rpartition(":")
    (entry,) = [i for i in kustomization()["images"] if i["name"] == name]
    assert entry["newTag"] == tag == project_version()


def test_cronjob_schedule_concurrency_history_and_limits() -> None:
    spec = the_object("CronJob")["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 1 <= spec["successfulJobsHistoryLimit"] <= 10
    assert 1 <= spec["failedJobsHistoryLimit"] <= 10
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["activeDeadlineSeconds"] > 0
    resources = cronjob_container()["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[section]), section


def test_cronjob_runs_non_root_read_only_without_capabilities() -> None:
    pod = the_object("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == CONTROLLER_UID
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = cronjob_container()["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not sc.get("privileged", False)


def test_controller_image_user_is_the_uid_the_cronjob_runs_as() -> None:
    dockerfile = (REPO / "controller" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert users, "controller/Dockerfile sets no USER"
    assert users[-1] == f"{CONTROLLER_UID}:{CONTROLLER_UID}"


# -- the command line against the real CLI -----------------------------------------------


def parse_janitorctl(args: list[str]) -> tuple[click.Context, click.Context]:
    """Parse ``args`` as the real ``janitorctl`` would, without running anything: the
    group's options, then the subcommand and its options. Unknown options, a missing or
    unknown subcommand, bad values: click raises ``UsageError``."""
    group = controller_cli.cli
    assert isinstance(group, click.Group)
    for i, arg in enumerate(args):
        if arg.startswith("-") or arg not in group.commands:
            continue
        # The group's own options come before the subcommand; with none, parse the bare
        # subcommand name (click refuses an empty command line with its help).
        try:
            ctx = group.make_context("janitorctl", args[:i] if i else [arg])
        except click.UsageError:
            continue  # args[i] is the value of an option, not the subcommand
        if ctx.args:
            continue
        command = group.commands[arg]
        sub_ctx = command.make_context(arg, args[i + 1 :], parent=ctx)
        return ctx, sub_ctx
    raise click.UsageError(f"no janitorctl subcommand in {args}")


def option_value(contexts: tuple[click.Context, ...], flag: str) -> Any:
    for ctx in contexts:
        for param in ctx.command.params:
            if flag in param.opts:
                return ctx.params[param.name or ""]
    raise AssertionError(f"janitorctl has no option {flag}")


def test_the_parser_rejects_what_janitorctl_rejects() -> None:
    """The check below would catch a wrong command line."""
    with pytest.raises(click.UsageError):
        parse_janitorctl(["--fleet", "/f.yaml", "no-such-command"])
    with pytest.raises(click.UsageError):
        parse_janitorctl(["--fleet", "/f.yaml", "run", "--no-such-option"])
    _, sub = parse_janitorctl(["--fleet", "/f.yaml", "run", "--dry-run"])
    assert sub.info_name == "run"
    assert sub.params["dry_run"] is True


def test_cronjob_command_is_a_janitorctl_run_the_real_cli_accepts() -> None:
    container = cronjob_container()
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] == "janitorctl"
    with (REPO / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["janitorctl"] == "controller.cli:main"
    ctx, sub = parse_janitorctl(argv[1:])
    assert sub.info_name == "run"
    assert option_value((ctx, sub), "--dry-run") is False  # the nightly run applies
    fleet = option_value((ctx, sub), "--fleet")
    assert fleet is not None, "the CronJob names no fleet file"
    assert PurePosixPath(fleet) == PurePosixPath("/etc/nas-janitor/fleet.yaml")


def mounts_by_path() -> dict[PurePosixPath, dict[str, Any]]:
    pod = the_object("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {
        PurePosixPath(m["mountPath"]): volumes[m["name"]]
        for m in cronjob_container()["volumeMounts"]
    }


def test_fleet_file_from_the_configmap_loads_and_its_files_are_mounted(tmp_path: Path) -> None:
    """The ConfigMap's fleet.yaml, mounted where the CronJob says, loads with the real
    fleet loader; each file it names (CA, token) is in a volume the pod mounts."""
    configmap = the_object("ConfigMap")
    mounts = mounts_by_path()
    fleet_arg = PurePosixPath("/etc/nas-janitor/fleet.yaml")
    fleet_volume = mounts[fleet_arg.parent]
    assert fleet_volume["configMap"]["name"] == configmap["metadata"]["name"]
    for key, text in configmap["data"].items():
        (tmp_path / key).write_text(text)

    fleet = load_fleet(tmp_path / fleet_arg.name)
    assert fleet.agents

    secret_volume = next(v for v in mounts.values() if "secret" in v)
    secret = the_object("Secret")
    assert secret_volume["secret"]["secretName"] == secret["metadata"]["name"]
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))

    def in_pod(path: Path) -> PurePosixPath:
        return fleet_arg.parent / path.relative_to(tmp_path).as_posix()

    for agent in fleet.agents:
        assert agent.token_file is not None, f"{agent.name}: tokens come from the Secret"
        token = in_pod(agent.token_file)
        assert mounts[token.parent] is secret_volume, f"{agent.name}: {token}"
        assert token.name in secret_keys
        if agent.ca is not None:
            ca = in_pod(agent.ca)
            assert mounts[ca.parent] is fleet_volume
            assert ca.name in configmap["data"]
    # The run history goes to the claim, kept from run to run (not the read-only root
    # file system, nor an emptyDir that each run starts without).
    assert fleet.store is not None
    store = PurePosixPath(fleet.store.as_posix())
    claim = the_object("PersistentVolumeClaim")["metadata"]["name"]
    assert mounts[store.parent] == {"name": "state", "persistentVolumeClaim": {"claimName": claim}}


# -- the store on a PersistentVolumeClaim --------------------------------------------------------

OVERLAY_DIR = REPO / "deploy" / "k8s-overlays" / "storage-class"


def test_the_store_is_a_claim_on_k3s_local_path_storage() -> None:
    pvc = the_object("PersistentVolumeClaim")
    spec = pvc["spec"]
    assert spec["storageClassName"] == "local-path"  # k3s's own provisioner
    assert spec["accessModes"] == ["ReadWriteOnce"]  # one run at a time: Forbid
    assert the_object("CronJob")["spec"]["concurrencyPolicy"] == "Forbid"
    assert spec["resources"]["requests"]["storage"]
    pod = the_object("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in claims] == [pvc["metadata"]["name"]]
    assert not any("emptyDir" in v for v in pod["volumes"] if v["name"] == "state")


def deep_merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as kustomize applies one without lists: maps merged key
    by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: deep_merge(base.get(k), v) for k, v in patch.items()}}
    return patch


def test_the_storage_class_overlay_patches_the_claim_of_the_base() -> None:
    """deploy/k8s-overlays/storage-class (the README's example): its base is deploy/k8s,
    its patch names the base's claim, and the patched claim is a valid one with the
    other class and everything else as it was."""
    overlay = yaml.safe_load((OVERLAY_DIR / "kustomization.yaml").read_text())
    assert [(OVERLAY_DIR / r).resolve() for r in overlay["resources"]] == [K8S_DIR.resolve()]
    (entry,) = overlay["patches"]
    patch = yaml.safe_load((OVERLAY_DIR / entry["path"]).read_text())
    pvc = the_object("PersistentVolumeClaim")
    for key in ("apiVersion", "kind"):
        assert patch[key] == pvc[key]
    for key in ("name", "namespace"):
        assert patch["metadata"][key] == pvc["metadata"][key]
    patched = deep_merge(pvc, patch)
    assert patched["spec"]["storageClassName"] == "longhorn" != pvc["spec"]["storageClassName"]
    assert {k: v for k, v in patched["spec"].items() if k != "storageClassName"} == {
        k: v for k, v in pvc["spec"].items() if k != "storageClassName"
    }
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)


# -- the tokens Secret, mounted so that janitorctl takes it -------------------------------------

RO_MASK = 0o440  # what the kubelet adds to a read-only volume's files with fsGroup


def secret_volume_as_kubelet_makes_it(
    folder: Path, keys: dict[str, str], *, default_mode: int, fs_group: int | None
) -> None:
    """A Secret's volume the way the kubelet writes it (the atomic writer's
    ``..data`` symlink to a timestamped folder, a symlink per key), then, with an
    fsGroup, its ownership change: group ``fsGroup``, and the read-only mask (0440)
    added to every file's mode (``changeFilePermission`` in pkg/volume/volume_linux.go)."""
    data = folder / "..2026_11_28_03_30_00.000000001"
    data.mkdir(parents=True)
    for key, value in keys.items():
        (data / key).write_text(value)
        (data / key).chmod(default_mode)
        (folder / key).symlink_to(f"..data/{key}")
    (folder / "..data").symlink_to(data.name)
    if fs_group is not None:
        for path in (folder, data, *(data / k for k in keys)):
            os.chown(path, 0, fs_group)
            mode = path.stat().st_mode & 0o7777
            extra = 0o2000 | 0o110 | RO_MASK if path.is_dir() else RO_MASK
            path.chmod(mode | extra)


def read_as(uid: int, gid: int, path: Path, groups: tuple[int, ...] = ()) -> str:
    """``token_from_file(path)`` in a child process running as ``uid:gid`` with the
    supplementary ``groups`` (a pod's fsGroup is one)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid:gid, read, report, exit
        os.close(read)
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            result = "ok:" + token_from_file(path)
        except BaseException as exc:
            result = f"error:{exc}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder every user can pass through (pytest's own are root's only)."""
    folder = Path(tempfile.mkdtemp(prefix="nas-janitor-k8s-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


def test_the_tokens_secret_is_mounted_so_that_janitorctl_takes_it(open_tmp: Path) -> None:
    """The Secret's volume as the kubelet makes it from the CronJob's settings
    (defaultMode, fsGroup): uid 10001 reads its token, and janitorctl's rule for
    secret files (not world-readable, not writable by others) holds. A Secret mounted
    with the default mode (0644) would be refused."""
    if os.geteuid() != 0:
        missing_prerequisite("root, to make the files root:10001 and read them as 10001")
    pod = the_object("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    default_mode = volume["secret"].get("defaultMode", 0o644)
    fs_group = pod["securityContext"].get("fsGroup")
    run_as = (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    groups = (fs_group,) if fs_group is not None else ()
    keys = {"nas1": "nj_the-token\n"}
    tmp_path = open_tmp

    mounted = tmp_path / "tokens"
    secret_volume_as_kubelet_makes_it(mounted, keys, default_mode=default_mode, fs_group=fs_group)
    assert token_from_file(mounted / "nas1") == "nj_the-token"
    assert oct((mounted / "nas1").stat().st_mode & 0o777) == oct(0o440)
    assert read_as(*run_as, mounted / "nas1", groups) == "ok:nj_the-token"
    # another uid, outside the group: cannot read it at all
    assert read_as(4242, 4242, mounted / "nas1").startswith("error:")

    # what the Secret's default mode would have given: refused, world-readable
    default = tmp_path / "default-mode"
    secret_volume_as_kubelet_makes_it(default, keys, default_mode=0o644, fs_group=fs_group)
    with pytest.raises(ConfigError, match=r"world-readable \(mode 0644\)"):
        token_from_file(default / "nas1")
    # and without fsGroup, 0440 stays root:root: uid 10001 cannot read it
    no_group = tmp_path / "no-fs-group"
    secret_volume_as_kubelet_makes_it(no_group, keys, default_mode=default_mode, fs_group=None)
    assert read_as(*run_as, no_group / "nas1").startswith("error:")
