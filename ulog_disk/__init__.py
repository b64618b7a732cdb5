"""ulog-disk: a userspace dirty-log server for device-mapper mirrors with a durable store."""

__version__ = "0.1.0"
