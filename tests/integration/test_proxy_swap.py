"""A coordinator swapped to another model between two requests (what `tightwad swap` and the
swap playbook do) is noticed: the proxy looks at /props again (target.recheck_s) and probes the
new model afresh instead of serving it with the old model's end-of-generation ids and context."""

from __future__ import annotations

from openai import OpenAI

from tightwad_dev.inproc import ProxyThread, proxy_config


def test_proxy_notices_a_swapped_model(procs, models):
    first = procs.llama_server(models.target, name="before")
    port = first.port
    config = proxy_config(first, None, speculation={"mode": "off"}, target={"recheck_s": 0})
    proxy = ProxyThread(config).start()
    try:
        client = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", timeout=60, max_retries=0)
        assert client.completions.create(model="m", prompt="Hello", max_tokens=4,
                                          temperature=0).usage.completion_tokens > 0
        assert proxy.status()["target"]["model"].endswith(models.target.name)
        # The swap: same address, another model, and no request in between to fail.
        first.stop()
        procs.llama_server(models.draft, name="after", port=port)
        reply = client.completions.create(model="m", prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens > 0
        assert proxy.status()["target"]["model"].endswith(models.draft.name)
    finally:
        proxy.stop()
