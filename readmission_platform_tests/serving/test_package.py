"""A packer killed with SIGKILL while it copies a Bento into BentoML's store leaves nothing half-made to list or serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from readmission_platform_tests.serving.conftest import register, registry_of

# On the packer's PYTHONPATH: once BentoML has copied a Bento's manifest, the packer SIGKILLs itself.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    import shutil
    import signal

    copy = shutil.copy

    def copy_then_die(source, destination, **kwargs):
        copied = copy(source, destination, **kwargs)
        if os.path.basename(str(copied)) == "bento.yaml":
            os.kill(os.getpid(), signal.SIGKILL)
        return copied

    shutil.copy = copy_then_die
    """
)


def pack(settings, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "readmission_platform.serving.package", "--tracking-uri", settings.mlflow_tracking_uri,
               "--artifact-root", settings.mlflow_artifact_root.as_uri(), "--bentoml-home", str(settings.bentoml_home)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})


def listed(settings, what: str) -> list[dict]:
    """What `bentoml list` (or `bentoml models list`) shows in a fresh process."""
    command = [str(os.path.join(os.path.dirname(sys.executable), "bentoml")), *what.split(), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "BENTOML_HOME": str(settings.bentoml_home)}, check=True)
    return json.loads(done.stdout)


def test_a_packer_killed_mid_copy_leaves_no_half_built_bento_and_the_next_builds_it(tmp_path, new_home, sample_candidates, sample_parts):
    settings = new_home(tmp_path / "home")
    register(registry_of(settings), sample_candidates["logistic_regression"], sample_parts, promote=True)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)

    killed = pack(settings, {"PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))})

    assert killed.returncode == -9, killed.stderr[-2000:]
    assert listed(settings, "list") == []
    assert not (settings.bentoml_home / "bentos" / "readmission").exists()
    assert [m["tag"] for m in listed(settings, "models list")] == ["readmission-classifier:v1"]

    done = pack(settings, {})

    assert done.returncode == 0, done.stderr[-2000:]
    built = json.loads(done.stdout.splitlines()[-1])
    assert [b["tag"] for b in listed(settings, "list")] == [built["bento"]] and built["built"]
    entry = settings.bentoml_home / "bentos" / "readmission" / built["bento"].split(":")[1]
    assert (entry / "src" / "readmission_platform" / "serving" / "service.py").is_file()
    assert not (settings.bentoml_home / ".staging").exists()
