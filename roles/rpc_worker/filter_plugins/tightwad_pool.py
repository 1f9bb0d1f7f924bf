"""Pool addresses from the inventory, as a Jinja filter.

A host's pool address is ``tightwad_pool_address`` when the inventory sets it (the address on
the network the pool uses), else ``ansible_host``, else its inventory name.
"""

from __future__ import annotations


def tightwad_pool_addresses(hosts, hostvars) -> list:
    addresses = []
    for host in hosts or []:
        hv = hostvars[host]
        address = hv.get("tightwad_pool_address") or hv.get("ansible_host") or host
        if address not in addresses:
            addresses.append(str(address))
    return addresses


class FilterModule:
    def filters(self) -> dict:
        return {"tightwad_pool_addresses": tightwad_pool_addresses}
