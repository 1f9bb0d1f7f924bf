"""Pure rule planning for the pool_firewall role: what ufw and firewalld must be told so that
exactly the wanted rules are there (an earlier run's rules for another address are replaced,
not kept next to the new ones). The role reads the firewall's current rules on the host and
runs the commands these filters return; tests feed them text directly."""

from __future__ import annotations

import ipaddress
import shlex


def _family(address: str) -> str:
    return "ipv6" if ipaddress.ip_address(address.split("/")[0]).version == 6 else "ipv4"


def tightwad_ufw_rules(name: str, sources: list, ports: list) -> list[list[str]]:
    """The ufw rules (as ``ufw show added`` prints them, without ``ufw``): an allow per source
    and port, then a deny per port, all commented ``tightwad-NAME``."""
    comment = f"tightwad-{name}"
    rules = [["allow", "proto", "tcp", "from", str(src), "to", "any", "port", str(port),
              "comment", comment] for src in sources for port in ports]
    rules += [["deny", "proto", "tcp", "to", "any", "port", str(port), "comment", comment]
              for port in ports]
    return rules


def tightwad_ufw_commands(show_added: str, name: str, sources: list, ports: list) -> list:
    """argv lists turning the ``tightwad-NAME`` rules in ``ufw show added`` into exactly the
    wanted ones: nothing when they already are; else delete every old one, then add the new
    ones in order (ufw appends, and the allows must come before the deny)."""
    comment = f"tightwad-{name}"
    current = []
    for line in show_added.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("ufw ") else []
        if len(words) > 2 and words[-2:] == ["comment", comment]:
            current.append(words[1:])
    wanted = tightwad_ufw_rules(name, sources, ports)
    if current == wanted:
        return []
    deletes = [["ufw", "delete", *rule[:-2]] for rule in current]
    return deletes + [["ufw", *rule] for rule in wanted]


def tightwad_firewalld_rules(sources: list, ports: list) -> list[str]:
    """Rich rules admitting each source to each port, in firewalld's own spelling."""
    return [f'rule family="{_family(str(src))}" source address="{src}" port port="{port}" '
            f'protocol="tcp" accept' for src in sources for port in ports]


def tightwad_firewalld_changes(list_rich_rules: str, sources: list, ports: list) -> dict:
    """Rich rules to add and to remove: every rule about one of ``ports`` that is not wanted
    goes (an old coordinator's address), the wanted ones missing come."""
    wanted = tightwad_firewalld_rules(sources, ports)
    marks = [f'port port="{port}" protocol="tcp"' for port in ports]
    current = [line.strip() for line in list_rich_rules.splitlines()
               if any(mark in line for mark in marks)]
    return {"add": [rule for rule in wanted if rule not in current],
            "remove": [rule for rule in current if rule not in wanted]}


class FilterModule:
    def filters(self) -> dict:
        return {"tightwad_ufw_rules": tightwad_ufw_rules,
                "tightwad_ufw_commands": tightwad_ufw_commands,
                "tightwad_firewalld_rules": tightwad_firewalld_rules,
                "tightwad_firewalld_changes": tightwad_firewalld_changes}
