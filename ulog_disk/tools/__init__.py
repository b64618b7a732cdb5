"""The admin tools: ``ulog-dump`` (read-only decoders) and ``ulog-recover`` (checks and repairs).

* :mod:`.dump` — ``ulog-dump store|wire|disklog``: the store, a capture of kernel frames, the
  kernel's ``disk`` log, as text for people or ``--json`` (keys: ``formats/tools-json.md``).
* :mod:`.recover` — ``ulog-recover list|verify|purge|resync|backup|export|import``.
* :mod:`.storeview` — reads a state directory without disturbing a running daemon (LMDB
  read-only transactions) and judges every instance (live, suspended, orphaned, superseded,
  damaged).
* :mod:`.wiredump` — decodes captures and hex frames, pairs requests with replies.
* :mod:`.common` — output, the state directory's lock, confirmation, region lists.

Every byte layout comes from the package's construct definitions (``store_format``, ``disklog``,
``capture``, ``wire``); nothing here knows an offset.
"""
