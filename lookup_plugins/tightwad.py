"""``lookup('tightwad', 'pin' | 'build_script' | 'patches_dir' | 'source_dir')``: what the
controller's tightwad package knows, so the roles reach into no Python source tree by relative
paths.

- ``pin``: the llama.cpp commit every host runs (``tightwad.build.PIN_COMMIT``).
- ``build_script``: ``tightwad/build.py`` itself, the one file a remote build host gets.
- ``patches_dir``: the llama.cpp patches the package ships (``tightwad/patches/llama.cpp``), so
  they always match the installed build logic.
- ``source_dir``: the checkout the package was installed from (``pip install .`` or ``-e .``;
  pip records it in the distribution's ``direct_url.json``, PEP 610): the proxy's wheel is
  built from there.

The controller's Ansible runs in the Python tightwad is installed in (docs/deploy.md).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

_NOT_INSTALLED = ("the tightwad package is not importable by the Python that runs Ansible: run "
                  "ansible-playbook from the environment tightwad is installed in (scripts/"
                  "bootstrap's .venv, or pip install ansible-core next to tightwad)")


def source_dir() -> Path:
    """The local directory pip installed tightwad from."""
    try:
        raw = metadata.distribution("tightwad").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        raise AnsibleLookupError(_NOT_INSTALLED) from None
    info = json.loads(raw) if raw else {}
    url = urllib.parse.urlparse(str(info.get("url", "")))
    path = Path(urllib.request.url2pathname(url.path)) if url.scheme == "file" else None
    if "dir_info" not in info or path is None or not path.is_dir():
        raise AnsibleLookupError(
            "the controller's tightwad was not installed from a checkout (pip install . or "
            "pip install -e . in a Tightwad checkout), so there is no proxy source to ship: "
            "install it from a checkout, or set proxy_source_dir")
    return path


def answer(term: str) -> str:
    try:
        from tightwad import build
    except ImportError:
        raise AnsibleLookupError(_NOT_INSTALLED) from None
    if term == "pin":
        return build.PIN_COMMIT
    if term == "build_script":
        return str(Path(build.__file__).resolve())
    if term == "patches_dir":
        return str(build.default_patches_dir())
    if term == "source_dir":
        return str(source_dir())
    raise AnsibleLookupError(f"lookup('tightwad', {term!r}): ask for pin, build_script, "
                             "patches_dir or source_dir")


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        return [answer(str(term)) for term in terms]
