"""The dashboard against a real loopback pool (2 RPC workers, a pooled coordinator, a drafter,
the proxy with a token), in a real headless browser: Debian's chromium driven by selenium
through the system's chromedriver (scripts/bootstrap installs both; nothing is downloaded).

The page needs the token (and keeps it out of the address), shows every worker with the layers
the coordinator's load report puts on it, shows the tok/s and acceptance of the JSON and of
/tightwad/status within one refresh, turns a killed drafter's card red with the fallback
reason, and logs nothing to the console. ``tightwad status --watch`` renders the same pool in
a pseudo-terminal and ends cleanly on Ctrl-C. A screenshot is kept: ``$TIGHTWAD_DASHBOARD_SHOT``
or the test's tmp dir.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import REPO
from tightwad.llamaserver import blocking, wire
from tightwad.pool import localpool
from tightwad.pool.procs import LlamaServer, ProcessGroup, RpcWorker
from tightwad.server import dashboard
from tightwad_dev.inproc import PROXY_SLOTS, VERIFY_MAX_TOKENS, ProxyThread, proxy_config
from tightwad_dev.models import ModelSet

TOKEN = "dashboard-test-token-0123456789"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REFRESH_S = 1.0  # app.js REFRESH_MS
ASSIGNED = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\w+)")


@dataclass
class Pool:
    group: ProcessGroup  # conftest's failure report shows the logs of a fixture's group
    workers: list[RpcWorker]
    coordinator: LlamaServer
    drafter: LlamaServer


@pytest.fixture(scope="module")
def dash_pool(bin_dir: Path, models: ModelSet,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """Two workers, a coordinator run as the product runs it (the load report), and a
    drafter."""
    with ProcessGroup(bin_dir=bin_dir,
                      log_dir=tmp_path_factory.mktemp("logs-dashboard")) as group:
        workers = [group.rpc_worker(name=f"worker{i}") for i in range(2)]
        # -lv 5 (debug) after the product's -lv 4: the coordinator then also logs where it put
        # each layer, which the test compares with what the page shows.
        coordinator = group.llama_server(
            models.target, name="coordinator", rpc=workers, slots=PROXY_SLOTS,
            args=[*localpool.coordinator_args(VERIFY_MAX_TOKENS), "-lv", "5"])
        drafter = group.llama_server(models.draft, name="drafter", slots=PROXY_SLOTS)
        yield Pool(group, workers, coordinator, drafter)


def _start_proxy(pool: Pool, state_dir: Path, drafter: Any, **sections: Any) -> ProxyThread:
    """A proxy with a token in front of ``pool``'s coordinator and ``drafter``, drawing the pool
    from a state file as `tightwad start --local` writes it (with the proxy in it)."""
    config = proxy_config(pool.coordinator, drafter, auth={"token": TOKEN}, **sections)
    services = [localpool.service_from(w, "rpc") for w in pool.workers]
    services.append(localpool.service_from(pool.coordinator, "coordinator"))
    services.append(localpool.service_from(drafter, "drafter"))
    services.append(localpool.Service("proxy", "proxy", "127.0.0.1", config.listen.port,
                                      os.getpid(), localpool.start_ticks(os.getpid()), ""))
    localpool.save_state(state_dir, localpool.LocalState(
        bin_dir="", log_dir=str(state_dir), model="target.gguf", draft="draft.gguf", ctx=0,
        slots=PROXY_SLOTS, services=services))
    os.environ[dashboard.POOL_STATE_ENV] = str(localpool.state_path(state_dir))
    try:  # read when the app is made
        return ProxyThread(config).start()
    finally:
        del os.environ[dashboard.POOL_STATE_ENV]


@pytest.fixture(scope="module")
def dash(dash_pool: Pool, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[ProxyThread, Path]]:
    state_dir = tmp_path_factory.mktemp("dash-state")
    proxy = _start_proxy(dash_pool, state_dir, dash_pool.drafter)
    yield proxy, state_dir
    proxy.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are missing: run scripts/bootstrap")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,1500", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The system's driver, by path: selenium must never fetch one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _errors(driver: Any) -> list[dict[str, Any]]:
    """The console's errors since the last call (reading the log empties it)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := check():
                return value
        except Exception:  # an element not drawn yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


def _open(driver: Any, url: str) -> None:
    driver.get("about:blank")
    driver.get(url)


def _picture(proxy: ProxyThread) -> dict[str, Any]:
    return blocking.get_json(f"{proxy.url}/tightwad/dashboard.json", token=TOKEN, timeout=10)


def _generate(proxy: ProxyThread, n: int = 3) -> None:
    for i in range(n):
        blocking.post_json(f"{proxy.url}/v1/completions", {
            "prompt": f"The pool number {i} says", "max_tokens": 48, "temperature": 0},
            token=TOKEN, timeout=120)


def _shot(driver: Any, tmp_path: Path, name: str) -> Path:
    where = Path(os.environ.get("TIGHTWAD_DASHBOARD_SHOT") or tmp_path / name)
    where.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(where)) and where.stat().st_size > 10_000
    return where


def test_the_page_needs_the_token_and_keeps_it_out_of_the_address(
        dash: tuple[ProxyThread, Path], browser: Any) -> None:
    proxy, _ = dash
    assert blocking.probe(f"{proxy.url}/tightwad/dashboard.json").status == 401
    assert blocking.probe(f"{proxy.url}/tightwad/dashboard.json", token="wrong").status == 401
    # The page itself is public and holds no data: the login form, no pool.
    _open(browser, f"{proxy.url}/")
    assert browser.current_url.endswith("/dashboard")
    _until(lambda: browser.find_element("id", "login").is_displayed(), 10, "the login form")
    assert not browser.find_element("id", "board").is_displayed()
    assert "worker0" not in browser.page_source
    # A wrong token is refused (its 401 is the one console error expected here).
    browser.find_element("id", "token").send_keys("not-the-token")
    browser.find_element("css selector", "#login button").click()
    _until(lambda: "refused" in browser.find_element("id", "login-error").text, 10,
           "the refusal")
    assert not browser.find_element("id", "board").is_displayed()
    assert [e for e in _errors(browser) if "401" not in e["message"]] == []
    # The token in the fragment: taken, kept in the tab, and removed from the address.
    _open(browser, f"{proxy.url}/dashboard#token={TOKEN}")
    _until(lambda: browser.find_element("id", "board").is_displayed(), 10, "the board")
    assert TOKEN not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('tightwad-token')") == TOKEN
    # The form works too.
    browser.find_element("id", "logout").click()
    _until(lambda: browser.find_element("id", "login").is_displayed(), 5, "the form again")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("css selector", "#login button").click()
    _until(lambda: browser.find_element("id", "board").is_displayed(), 10, "the board")
    assert _errors(browser) == []


def test_every_worker_shows_the_layers_the_coordinator_reports(
        dash_pool: Pool, dash: tuple[ProxyThread, Path], browser: Any) -> None:
    proxy, _ = dash
    log = dash_pool.coordinator.log_text()
    # The coordinator's own word (llama.cpp's debug line per layer), devices by endpoint.
    where = {d.name: d.where for d in wire.parse_load_devices(log)}
    layers = {int(il): where.get(dev, dev) for il, dev in ASSIGNED.findall(log)}
    spans = dashboard.layer_spans(layers)
    assert layers and {f"{w.host}:{w.port}" for w in dash_pool.workers} <= set(spans), spans
    _open(browser, f"{proxy.url}/dashboard#token={TOKEN}")
    for worker in dash_pool.workers:
        endpoint = f"{worker.host}:{worker.port}"
        want = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[endpoint])
        ident = f"worker-{worker.name}"
        card = _until(lambda: browser.find_element("id", ident),  # noqa: B023 (used at once)
                      10, f"{worker.name}'s card")
        assert card.get_attribute("data-endpoint") == endpoint
        assert card.get_attribute("data-layers") == want
        held = sum(b - a + 1 for a, b in spans[endpoint])
        assert f"({held} of {len(layers)})" in card.text, card.text
        assert "CPU" in card.text and "RTT" in card.text and "memory used" in card.text
        assert "ok" in card.get_attribute("class").split()
    picture = _picture(proxy)
    assert [w["name"] for w in picture["pool"]["workers"]] == ["worker0", "worker1"]
    assert picture["pool"]["n_layers"] == len(layers)  # the repeating ones and the output
    assert _errors(browser) == []


def test_tok_s_and_acceptance_match_the_json_within_one_refresh(
        dash: tuple[ProxyThread, Path], browser: Any, tmp_path: Path) -> None:
    proxy, _ = dash
    _generate(proxy)
    picture = _until(lambda: (p := _picture(proxy))["speculation"]["speculative_tok_s"]
                     and p, 30, "speculated rounds in the rolling window")
    assert picture["speculation"]["acceptance"] is not None
    _open(browser, f"{proxy.url}/dashboard#token={TOKEN}")
    time.sleep(2 * REFRESH_S + 0.5)  # nothing runs now: the numbers hold still
    shown = {key: browser.find_element("id", key).text
             for key in ("spec-tok-s", "alone-tok-s", "acceptance", "acceptance-total", "k")}
    picture = _picture(proxy)
    status = blocking.get_json(f"{proxy.url}/tightwad/status", token=TOKEN)
    sp = picture["speculation"]

    def fmt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    assert shown["spec-tok-s"] == fmt(sp["speculative_tok_s"], 1)
    assert shown["alone-tok-s"] == fmt(sp["target_only_tok_s"], 1)
    assert shown["acceptance"] == fmt(sp["acceptance"], 2)
    assert shown["acceptance-total"] == fmt(status["stats"]["acceptance"], 2) != "-"
    assert shown["k"] == str(status["speculation"]["k"])
    rows = browser.find_elements("css selector", "#requests tbody tr")
    assert len(rows) == len(picture["load"]["requests"]) >= 3
    print(f"dashboard screenshot: {_shot(browser, tmp_path, 'dashboard.png')}")
    assert _errors(browser) == []


def test_a_killed_drafter_turns_red_with_the_fallback_reason(
        dash_pool: Pool, procs: ProcessGroup, models: ModelSet, browser: Any,
        tmp_path: Path) -> None:
    drafter = procs.llama_server(models.draft, name="drafter-to-kill", slots=PROXY_SLOTS)
    # A fixed k: every round wants a draft (the adaptive controller may pause drafting on
    # these CPUs, and a round that wants none has nothing to fall back from).
    proxy = _start_proxy(dash_pool, tmp_path / "state", drafter,
                         speculation={"adaptive": False, "k_initial": 4})
    try:
        _generate(proxy, 1)
        _open(browser, f"{proxy.url}/dashboard#token={TOKEN}")
        card = _until(lambda: browser.find_element("id", "card-drafter"), 10, "the drafter card")
        assert "ok" in card.get_attribute("class").split()
        os.kill(drafter.pid, signal.SIGKILL)  # the drafter this test started
        killed = time.monotonic()
        _generate(proxy, 1)  # runs target-only: the rounds that wanted a draft fall back

        def red() -> bool:
            classes = browser.find_element("id", "card-drafter").get_attribute("class").split()
            return "bad" in classes and "down" in browser.find_element(
                "id", "fallback-reason").text
        _until(red, 5 + 2 * REFRESH_S, "a red drafter card with the fallback reason")
        took = time.monotonic() - killed
        assert "drafter" in browser.find_element("id", "problem-list").text
        assert "start the drafter" in browser.find_element("id", "problem-list").text
        print(f"drafter killed -> red card with the reason in {took:.1f} s")
        _shot(browser, tmp_path, "drafter-down.png")
        assert _errors(browser) == []
    finally:
        proxy.stop()


def _read_until(fd: int, wants: list[str], timeout: float) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if all(w in seen.decode("utf-8", "replace") for w in wants):
                break
    return seen.decode("utf-8", "replace")


def test_status_watch_renders_the_pool_and_ends_cleanly_on_ctrl_c(
        dash: tuple[ProxyThread, Path]) -> None:
    _, state_dir = dash
    env = {**os.environ, "COLUMNS": "200", "LINES": "60", "TERM": "xterm-256color",
           "TIGHTWAD_AUTH__TOKEN": TOKEN, "PYTHONPATH": str(REPO / "proxy")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the pseudo-terminal
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "tightwad.cli", "status", "--watch",
                                   "--local", "--state-dir", str(state_dir)], env)
    code = None
    try:
        # doctor's checks come in the background: the state's model file does not exist here.
        shown = _read_until(fd, ["worker0", "worker1", "speculation now", "doctor: fail"], 90)
        assert "worker0" in shown and "worker1" in shown and "speculation now" in shown, shown
        assert "doctor: fail" in shown, shown
        os.write(fd, b"\x03")  # Ctrl-C, through the terminal's line discipline
        rest = _read_until(fd, ["stopped watching"], 20)
        deadline = time.monotonic() + 20
        while code is None and time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            code = status if done else None
            time.sleep(0.05)
    finally:
        os.close(fd)
        if code is None:  # still ours (not reaped): end it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert code is not None, "the watch did not end on Ctrl-C"
    assert os.waitstatus_to_exitcode(code) == 0, rest
    assert "stopped watching" in rest and "Traceback" not in shown + rest
