"""The Ansible side of the one source of defaults, and how Ansible finds the Python side.

The roles' defaults are YAML literals (what ``ansible-doc`` and a reader of the role see); these
tests hold them, their argument specs and the pool filters' fallbacks to ``tightwad.defaults``,
so changing either side alone fails here. The roles find ``build.py``, the pin, the patches and
the proxy's source through the controller's installed package (lookup_plugins/tightwad.py),
never by a relative path into the Python tree.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from support import REPO
from tightwad import build, defaults
from tightwad.pool import context
from tightwad.pool.gguf_info import read_info
from tightwad.pool.placement import MiB

ROLES = REPO / "roles"

# role variable -> the tightwad.defaults value it must equal
EXPECTED: dict[str, Any] = {
    "coordinator_port": defaults.COORDINATOR_PORT,
    "coordinator_ctx_size": defaults.CTX_SIZE,  # "auto": tightwad.pool.context
    "coordinator_parallel": defaults.SLOTS,
    "coordinator_verify_max_tokens": defaults.VERIFY_MAX_TOKENS,
    "coordinator_output_top_n": defaults.OUTPUT_TOP_N,
    "drafter_port": defaults.DRAFTER_PORT,
    "drafter_ctx_size": defaults.CTX_SIZE,
    "drafter_parallel": defaults.SLOTS,
    # The building block's own defaults: those of its main user, the coordinator; its context is
    # an integer (its users pass their auto choice): SLOTS slots that doctor does not call small.
    "llama_server_port": defaults.COORDINATOR_PORT,
    "llama_server_ctx_size": defaults.CTX_PER_SLOT_SMALL * defaults.SLOTS,
    "llama_server_parallel": defaults.SLOTS,
    "proxy_port": defaults.PROXY_PORT,
    "rpc_worker_instances": [dict(instance) for instance in defaults.RPC_INSTANCES],
    "rpc_worker_peer_port_offset": defaults.RPC_PEER_PORT_OFFSET,
}


def _role(variable: str) -> str:
    return next(role.name for role in ROLES.iterdir() if variable.startswith(role.name + "_"))


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tightwad_test_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variable", sorted(EXPECTED))
def test_role_default_equals_tightwad_defaults(variable: str) -> None:
    role = ROLES / _role(variable)
    role_defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    assert role_defaults[variable] == EXPECTED[variable], f"{role.name}/defaults/main.yml"
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    option = spec["argument_specs"]["main"]["options"][variable]
    assert option.get("default") == EXPECTED[variable], f"{role.name}/meta/argument_specs.yml"


def test_pool_filters_fall_back_to_the_same_defaults() -> None:
    """The proxy reads the coordinator's and drafter's variables through hostvars, which do not
    carry role defaults: the filters supply them, and they must be the roles' own."""
    pool = _load(REPO / "filter_plugins" / "tightwad_pool.py")
    assert pool.ROLE_DEFAULTS, "the filter plugin lost its role defaults"
    for variable, value in pool.ROLE_DEFAULTS.items():
        assert value == EXPECTED[variable], variable
    assert pool.tightwad_rpc_endpoints(["w"], {"w": {}})[0]["port"] == defaults.RPC_PORT


def test_auto_context_is_the_packages_rule_for_the_model_file(models) -> None:
    """``*_ctx_size: auto`` (the tightwad_ctx_size filter the coordinator and drafter roles
    call) is tightwad.pool.context's choice for the GGUF the role deploys."""
    pool = _load(REPO / "filter_plugins" / "tightwad_pool.py")
    info = read_info(models.target)
    for slots, free_mib in ((4, [64 * 1024]), (2, [300, 200]), (4, [1])):
        got = pool.tightwad_ctx_size(str(models.target), slots, free_mib)
        want = context.choose_for_model(info, slots, [m * MiB for m in free_mib])
        assert (got["ctx_size"], got["per_slot"], got["limit"], got["warning"]) == \
            (want.ctx_size, want.per_slot, want.limit, want.warning)
        assert got["trained"] == info.arch_value("context_length") > 0
    # The drafter's: at most the coordinator's slot.
    capped = pool.tightwad_ctx_size(str(models.draft), 4, [64 * 1024], "drafter", 1024)
    assert capped["per_slot"] == 1024 and capped["limit"] == "cap per slot"
    with pytest.raises(pool.AnsibleFilterError, match="set drafter_ctx_size to a number"):
        pool.tightwad_ctx_size("", 4, [1024], "drafter")


def test_no_role_reaches_into_the_python_tree_by_a_relative_path() -> None:
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for path in sorted(ROLES.rglob("*")) if path.is_file()
                 and path.suffix in (".yml", ".j2", ".py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "../" in line or "proxy/tightwad" in line]
    assert offenders == []


def test_the_roles_ask_the_installed_package() -> None:
    """lookup('tightwad', ...) answers from the tightwad the controller's Ansible imports: this
    venv's editable install of this checkout."""
    pytest.importorskip("ansible", reason="ansible-core is not installed")
    lookup = _load(REPO / "lookup_plugins" / "tightwad.py")
    assert lookup.answer("pin") == build.PIN_COMMIT
    assert Path(lookup.answer("build_script")) == Path(build.__file__).resolve()
    assert Path(lookup.answer("source_dir")).resolve() == REPO.resolve()
    assert Path(lookup.answer("patches_dir")) == build.default_patches_dir()
    from ansible.errors import AnsibleLookupError
    with pytest.raises(AnsibleLookupError, match="pin, build_script, patches_dir or source_dir"):
        lookup.answer("commit")
