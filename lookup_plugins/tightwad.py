"""``lookup('tightwad', 'pin' | 'build_script' | 'patches_dir' | 'source_dir' | 'probe_zip' |
'python_min')``: what the controller's tightwad package knows, so the roles reach into no Python
source tree by relative paths.

- ``pin``: the llama.cpp commit every host runs (``tightwad.build.PIN_COMMIT``).
- ``build_script``: ``tightwad/build.py`` itself, the one file a remote build host gets.
- ``patches_dir``: the llama.cpp patches the package ships (``tightwad/patches/llama.cpp``), so
  they always match the installed build logic.
- ``source_dir``: the checkout the package was installed from (``pip install .`` or ``-e .``;
  pip records it in the distribution's ``direct_url.json``, PEP 610): the proxy's wheel is
  built from there.
- ``probe_zip``: the package's Python modules as one zip in the controller's cache
  (``<cache>/probe/tightwad.zip``, :func:`probe_zip`), for ``python -m tightwad.pool.probe`` on
  the coordinator's host (the coordinator role ships it). The probe imports the standard library
  only (tests/unit/test_import_graph.py holds it to that), so the zip is all it needs there. Its
  entries carry fixed timestamps and modes: the same sources give the same bytes, so copying it
  again changes nothing.
- ``python_min``: the oldest Python the package runs on (``Requires-Python``, e.g. ``3.10``).

The controller's Ansible runs in the Python tightwad is installed in (docs/deploy.md).
"""

from __future__ import annotations

import io
import json
import os
import re
import urllib.parse
import urllib.request
import zipfile
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


ZIP_TIME = (1980, 1, 1, 0, 0, 0)
"""Every entry's timestamp in the probe's zip (the earliest a zip can hold)."""


def probe_zip_bytes(package: Path) -> bytes:
    """The ``*.py`` modules under ``package`` (a ``tightwad`` directory) as a zip, entries in
    name order with fixed timestamps and modes: nothing in it depends on when or where it was
    made. Patches and static assets stay out (the probe needs neither)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
            if "__pycache__" in path.parts:
                continue
            info = zipfile.ZipInfo(f"tightwad/{path.relative_to(package).as_posix()}", ZIP_TIME)
            info.create_system = 3  # Unix, so that the mode below is read as one
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes(), compresslevel=9)
    return buf.getvalue()


def probe_zip(cache_dir: Path) -> Path:
    """``<cache_dir>/probe/tightwad.zip`` made from the importable tightwad package, rewritten
    only when its bytes change (atomically: forks of one play may ask at once)."""
    from tightwad import build

    data = probe_zip_bytes(Path(build.__file__).resolve().parent)
    dest = cache_dir / "probe" / "tightwad.zip"
    try:
        if dest.read_bytes() == data:
            return dest
    except OSError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def python_min() -> str:
    """The lowest Python version the installed tightwad accepts (its ``Requires-Python``)."""
    try:
        spec = metadata.metadata("tightwad").get("Requires-Python") or ""
    except metadata.PackageNotFoundError:
        raise AnsibleLookupError(_NOT_INSTALLED) from None
    found = re.search(r">=\s*(\d+\.\d+)", spec)
    if found is None:
        raise AnsibleLookupError(f"tightwad's Requires-Python is {spec!r}: no lower bound")
    return found.group(1)


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
    if term == "probe_zip":
        return str(probe_zip(build.default_cache_dir()))
    if term == "python_min":
        return python_min()
    raise AnsibleLookupError(f"lookup('tightwad', {term!r}): ask for probe_zip, python_min, "
                             "pin, build_script, patches_dir or source_dir")


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        return [answer(str(term)) for term in terms]
