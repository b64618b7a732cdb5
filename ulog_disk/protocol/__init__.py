"""The protocol: the kernel's frames and requests, defined once (bytes <-> values)."""
