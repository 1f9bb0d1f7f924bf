"""The llama_cpp role: backend detection and build flags, pin refusal, syntax and argument specs.

Detection is exercised twice: the role's filter directly with fake probe output, and the role's
own detection tasks run by ansible-playbook against this machine with fake ``uname``,
``nvidia-smi`` and ``rocminfo`` first on PATH. The cmake flags are asserted through
``tightwad.build`` itself, which the role calls.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO
from tightwad import build

ROLE = REPO / "roles" / "llama_cpp"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"

ROCMINFO_7900XTX = """\
ROCk module is loaded
*******
Agent 1
*******
  Name:                    AMD Ryzen 9 7950X 16-Core Processor
  Uuid:                    CPU-XX
  Device Type:             CPU
*******
Agent 2
*******
  Name:                    gfx1100
  Uuid:                    GPU-0123456789abcdef
  Marketing Name:          Radeon RX 7900 XTX
  Device Type:             GPU
"""


def _load_filters():
    spec = importlib.util.spec_from_file_location(
        "tightwad_backend_filters", ROLE / "filter_plugins" / "tightwad_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


filters = _load_filters()


def cmake_flags_for(build_args: list[str]) -> list[str]:
    """The cmake flags tightwad.build derives from the role's arguments."""
    args = build._parser().parse_args(["path", *build_args])
    return build.cmake_flags(args.backend, cuda_arch=args.cuda_arch, rocm_target=args.rocm_target,
                             portable=args.portable, extra=args.cmake_arg)


# --- the filter, with fake probe output -------------------------------------------------------


def test_nvidia_compute_capability_becomes_cuda_architectures():
    got = filters.tightwad_backend({"uname": "Linux x86_64", "nvidia_smi": "8.9\n"})
    assert got["backend"] == "cuda" and got["cuda_arch"] == "89"
    assert got["kind"] == "linux-x86_64-cuda-sm89"
    flags = cmake_flags_for(got["build_args"])
    assert "-DGGML_CUDA=ON" in flags
    assert "-DCMAKE_CUDA_ARCHITECTURES=89" in flags
    assert "-DGGML_NATIVE=OFF" in flags  # shipped binaries never assume the build host's CPU


def test_native_builds_only_when_the_inventory_vouches_for_identical_cpus():
    got = filters.tightwad_backend({"uname": "Linux x86_64"}, portable=False)
    assert got["kind"] == "linux-x86_64-cpu-native"  # never shares a build with portable hosts
    assert "-DGGML_NATIVE=OFF" not in cmake_flags_for(got["build_args"])
    # ... which is then the very build the test suite makes for itself.
    assert cmake_flags_for(got["build_args"]) == build.cmake_flags("cpu")


def test_mixed_nvidia_gpus_get_every_architecture():
    got = filters.tightwad_backend({"uname": "Linux x86_64", "nvidia_smi": "8.6\n7.5\n8.6\n",
                                    "rocminfo": ROCMINFO_7900XTX})
    assert got["backend"] == "cuda" and got["cuda_arch"] == "75;86"
    assert "-DCMAKE_CUDA_ARCHITECTURES=75;86" in cmake_flags_for(got["build_args"])


def test_rocminfo_gfx_target_becomes_hip_targets():
    got = filters.tightwad_backend({"uname": "Linux x86_64", "nvidia_smi": "",
                                    "rocminfo": ROCMINFO_7900XTX})
    assert got["backend"] == "rocm" and got["rocm_target"] == "gfx1100"
    flags = cmake_flags_for(got["build_args"])
    assert "-DGGML_HIP=ON" in flags and "-DGPU_TARGETS=gfx1100" in flags
    assert not any(f.startswith("-DCMAKE_CUDA_ARCHITECTURES") for f in flags)


def test_apple_silicon_is_metal_and_intel_mac_is_cpu():
    got = filters.tightwad_backend({"uname": "Darwin arm64"})
    assert got["backend"] == "metal" and got["kind"] == "darwin-arm64-metal"
    flags = cmake_flags_for(got["build_args"])
    assert "-DGGML_METAL=ON" in flags and "-DGGML_METAL_EMBED_LIBRARY=ON" in flags
    assert filters.tightwad_backend({"uname": "Darwin x86_64"})["backend"] == "cpu"


def test_plain_linux_is_cpu():
    got = filters.tightwad_backend({"uname": "Linux x86_64", "nvidia_smi": None, "rocminfo": None})
    assert got["backend"] == "cpu" and got["kind"] == "linux-x86_64-cpu"
    assert "-DGGML_METAL=OFF" in cmake_flags_for(got["build_args"])


def test_inventory_overrides_win():
    assert filters.tightwad_backend({"uname": "Linux x86_64", "nvidia_smi": "8.9"},
                                    "vulkan")["backend"] == "vulkan"
    got = filters.tightwad_backend({"uname": "Linux x86_64"}, "auto", "86")
    assert got["backend"] == "cuda" and got["cuda_arch"] == "86"
    got = filters.tightwad_backend({"uname": "Linux x86_64", "nvidia_smi": "8.9"}, "cpu")
    assert got["backend"] == "cpu" and "--cuda-arch" not in got["build_args"]


@pytest.mark.parametrize("probe,backend,needle", [
    ({"uname": "Linux x86_64"}, "cuda", "llama_cpp_cuda_arch"),
    ({"uname": "Linux x86_64"}, "rocm", "llama_cpp_rocm_target"),
    ({"uname": "Linux x86_64"}, "metal", "macOS"),
    ({"uname": "Linux x86_64"}, "tpu", "choose auto"),
    ({"uname": "Linux x86_64", "nvidia_smi": "No devices were found"}, "auto", "llama_cpp_cuda_arch"),
    ({"uname": ""}, "auto", "uname"),
])
def test_impossible_choices_say_what_to_set(probe, backend, needle):
    with pytest.raises(filters.AnsibleFilterError, match=needle):
        filters.tightwad_backend(probe, backend)


@pytest.mark.parametrize("probe,portable", [
    ({"uname": "Linux x86_64", "nvidia_smi": "8.6\n7.5\n"}, True),
    ({"uname": "Linux x86_64", "rocminfo": ROCMINFO_7900XTX}, True),
    ({"uname": "Darwin arm64"}, True),
    ({"uname": "Linux x86_64"}, False),
], ids=["cuda", "rocm", "metal", "cpu-native"])
def test_build_key_is_the_one_tightwad_build_gives_the_build_args(probe, portable):
    """The role's key (controller-side filter) names the build `tightwad.build build
    <build_args>` makes: a mismatch would rebuild or reinstall on every run."""
    patches = build.default_patches_dir()
    got = filters.tightwad_backend(probe, portable=portable)
    expected = build.build_key(got["backend"], patches_dir=patches,
                               flags=cmake_flags_for(got["build_args"])).name
    assert filters.tightwad_build_key(got, str(patches)) == expected


def _hostvars(kind: str, build_host: str = "localhost", needs: bool = True) -> dict:
    return {"llama_cpp_detected": {"kind": kind, "backend": kind.split("-")[2],
                                   "build_args": ["--backend", kind.split("-")[2], "--portable"]},
            "_llama_cpp_key": f"key-{kind}", "_llama_cpp_needs_install": needs,
            "llama_cpp_build_host": build_host}


def test_build_plan_builds_each_kind_once():
    hv = {"a": _hostvars("linux-x86_64-cpu"), "b": _hostvars("linux-x86_64-cpu"),
          "c": _hostvars("linux-x86_64-cpu", needs=False),
          "m": _hostvars("darwin-arm64-metal", build_host="m")}
    plan = filters.tightwad_build_plan(["a", "b", "c", "m"], hv, "Linux x86_64")
    assert [(p["kind"], p["build_host"], p["hosts"]) for p in plan] == [
        ("linux-x86_64-cpu", "localhost", ["a", "b"]), ("darwin-arm64-metal", "m", ["m"])]
    assert filters.tightwad_build_plan(["c"], hv, "Linux x86_64") == []


def test_build_plan_refuses_conflicting_or_impossible_build_hosts():
    hv = {"a": _hostvars("linux-x86_64-cpu"), "b": _hostvars("linux-x86_64-cpu", build_host="a")}
    with pytest.raises(filters.AnsibleFilterError, match="different build hosts"):
        filters.tightwad_build_plan(["a", "b"], hv, "Linux x86_64")
    hv = {"m": _hostvars("darwin-arm64-metal")}
    with pytest.raises(filters.AnsibleFilterError, match="llama_cpp_build_host"):
        filters.tightwad_build_plan(["m"], hv, "Linux x86_64")


# --- the role's tasks, run by ansible-playbook against this machine ---------------------------


def run_playbook(tmp_path: Path, tasks: str, *extra: str, fake: dict[str, str] | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run ``tasks`` (YAML list, indented 4) in a play against localhost with ``fake`` tools
    (name -> shell script body) first on PATH."""
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir(exist_ok=True)
    for name, body in (fake or {}).items():
        (fake_bin / name).write_text("#!/bin/sh\n" + body)
        (fake_bin / name).chmod(0o755)
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        "- name: Exercise the llama_cpp role\n  hosts: all\n  gather_facts: false\n"
        "  environment:\n    PATH: \"{{ fake_bin }}:/usr/bin:/bin\"\n  tasks:\n" + tasks)
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(REPO / "roles"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    cmd = [str(PLAYBOOK_BIN), "-i", "localhost,", "-c", "local", str(playbook),
           "-e", f"fake_bin={fake_bin}", "-e", f"ansible_python_interpreter={sys.executable}",
           *extra]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result


DETECT_TASKS = """\
    - name: Detect
      ansible.builtin.include_role:
        name: llama_cpp
        tasks_from: detect
    - name: Compare with the host's record
      ansible.builtin.include_role:
        name: llama_cpp
        tasks_from: state
    - name: Write what the role decided
      ansible.builtin.copy:
        dest: "{{ out }}"
        mode: "0644"
        content: >-
          {{ {'detected': llama_cpp_detected, 'key': _llama_cpp_key,
              'needs_install': _llama_cpp_needs_install} | to_json }}
"""


@pytest.mark.parametrize("fake,expected_args,expected_flag", [
    ({"uname": 'echo "Linux x86_64"\n', "nvidia-smi": 'echo "8.6"\necho "7.5"\n'},
     ["--backend", "cuda", "--cuda-arch", "75;86", "--portable"],
     "-DCMAKE_CUDA_ARCHITECTURES=75;86"),
    ({"uname": 'echo "Linux x86_64"\n', "nvidia-smi": "exit 9\n",
      "rocminfo": f"cat <<'X'\n{ROCMINFO_7900XTX}X\n"},
     ["--backend", "rocm", "--rocm-target", "gfx1100", "--portable"], "-DGPU_TARGETS=gfx1100"),
    ({"uname": 'echo "Darwin arm64"\n'}, ["--backend", "metal", "--portable"], "-DGGML_METAL=ON"),
    ({"uname": 'echo "Linux aarch64"\n'}, ["--backend", "cpu", "--portable"], "-DGGML_NATIVE=OFF"),
], ids=["cuda", "rocm", "metal", "cpu"])
def test_role_detects_backend_on_a_host(tmp_path, fake, expected_args, expected_flag):
    out = tmp_path / "out.json"
    run_playbook(tmp_path, DETECT_TASKS, "-e", f"out={out}",
                 "-e", f"llama_cpp_install_dir={tmp_path / 'install'}", fake=fake)
    got = json.loads(out.read_text())
    assert got["detected"]["build_args"] == expected_args
    flags = cmake_flags_for(expected_args)
    assert expected_flag in flags
    # The key the role computed is tightwad.build's own key for those flags and this patch set.
    backend = expected_args[1]
    assert got["key"] == build.build_key(backend, patches_dir=build.default_patches_dir(),
                                         flags=flags).name
    assert got["needs_install"] is True  # nothing recorded in the empty install dir


def test_role_refuses_a_commit_other_than_the_pin(tmp_path):
    tasks = ("    - name: Preflight\n      ansible.builtin.include_role:\n"
             "        name: llama_cpp\n        tasks_from: preflight\n")
    ok = run_playbook(tmp_path, tasks, "-e", f"llama_cpp_commit={build.PIN_COMMIT}")
    assert "failed=0" in ok.stdout
    bad = run_playbook(tmp_path, tasks, "-e", "llama_cpp_commit=" + "f" * 40, check=False)
    assert bad.returncode != 0
    assert "asks for llama.cpp commit " + "f" * 40 in bad.stdout
    assert build.PIN_COMMIT in bad.stdout



VALIDATE_TASKS = """\
    - name: Validate against the role's argument spec
      ansible.builtin.validate_argument_spec:
        argument_spec: "{{ (lookup('ansible.builtin.file', spec) | from_yaml).argument_specs.main.options }}"
        provided_arguments: "{{ provided }}"
"""


@pytest.mark.parametrize("provided,ok", [
    ({"llama_cpp_backend": "cuda", "llama_cpp_cuda_arch": "86", "llama_cpp_build_host": "rig"}, True),
    ({"llama_cpp_backend": "auto", "llama_cpp_build_jobs": 4, "llama_cpp_install_build_deps": False},
     True),
    ({"llama_cpp_backend": "tpu"}, False),
    ({"llama_cpp_build_jobs": "many"}, False),
])
def test_argument_spec(tmp_path, provided, ok):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"provided": provided,
                                 "spec": str(ROLE / "meta" / "argument_specs.yml")}))
    result = run_playbook(tmp_path, VALIDATE_TASKS, "-e", f"@{extra}", check=False)
    assert (result.returncode == 0) == ok, result.stdout[-3000:]


def _recap_changed(stdout: str) -> int:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("localhost") and "changed=" in ln)
    return int(line.split("changed=")[1].split()[0])


def test_role_installs_once_and_a_rerun_changes_nothing(tmp_path):
    """The whole role against this machine: a CPU build on the controller (tightwad.build, a
    cache hit after the first time), shipped into a scratch install dir, recorded; the second
    run and a check-mode run change nothing; a record of another build makes it reinstall."""
    install = tmp_path / "install"
    tasks = ("    - name: Install llama.cpp\n      ansible.builtin.include_role:\n"
             "        name: llama_cpp\n")
    args = ("-e", f"llama_cpp_install_dir={install}", "-e", "llama_cpp_backend=cpu")
    first = run_playbook(tmp_path, tasks, *args)
    assert _recap_changed(first.stdout) > 0
    record = json.loads((install / "tightwad-llama-cpp.json").read_text())
    assert record["commit"] == build.PIN_COMMIT and record["backend"] == "cpu"
    version = subprocess.run([str(install / "bin" / "ggml-rpc-server"), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert build.PIN_SHORT in version.stdout + version.stderr

    assert _recap_changed(run_playbook(tmp_path, tasks, *args).stdout) == 0
    assert _recap_changed(run_playbook(tmp_path, tasks, "--check", *args).stdout) == 0

    record["build_key"] = "something-else"
    (install / "tightwad-llama-cpp.json").write_text(json.dumps(record))
    again = run_playbook(tmp_path, tasks, *args)
    assert _recap_changed(again.stdout) > 0
    assert json.loads((install / "tightwad-llama-cpp.json").read_text())["build_key"] != "something-else"
