"""The running kernel's boot id: what tells a daemon-only restart from a host reboot."""

from __future__ import annotations


def read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
