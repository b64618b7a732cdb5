"""Everything that drives dm-ulogd from outside, in one place: tests, the reliability suite, the
benchmarks and a backend plugin's own tests use it.

* :mod:`.launcher`: the daemon as a process (start on a unix socket or netlink, wait for ready,
  stop, kill -9, its log).
* :mod:`.client`: a raw SOCK_SEQPACKET client (one request at a time, or pipelined with
  :meth:`~.client.Client.many`) and the lean frame-template client of the benchmarks.
* :mod:`.kernel`: an in-process kernel driver: requests through the wire both ways into an
  :class:`~ulog_disk.log.engine.Engine`, no daemon, no socket.
* :mod:`.sentinel`: the fuzz tests' log that must keep working, set up and checked alike.
* :mod:`.journaled`: a journaled backend in memory that records what it is given and fails on
  demand, for the engine's and the daemon's tests.
* :mod:`.stats`: the one percentile definition of every figure (reliability and benchmarks).
* :mod:`.clock`: a clock the test moves by hand.
* :mod:`.fakecorosync`: corosync for several cluster-mode nodes in one process, every
  interleaving (order, membership, partitions, crashes) chosen by the test.
* :mod:`.vectors`: the golden vectors of ``formats/vectors`` as the format tests read them.
* :mod:`.tools`: ulog-dump and ulog-recover run in-process (exit status, stdout, stderr).
* :mod:`.handover`: stores made by a real daemon (a hand-over cut by ``kill -9``) for the tools'
  tests.
* :mod:`.conformance`: what every backend must show, as a pytest class a plugin subclasses
  (see ``docs/backends.md``).

Why it is inside the installed package and not under ``tests/``: a backend plugin is written
against an installed ``ulog-disk``, without this repository's ``tests/``, and runs the
conformance suite against its own class; the tools under ``tools/`` run without pytest. Only
:mod:`.conformance` needs pytest (the ``testing`` extra); nothing else here imports it, and
nothing in the daemon imports this package.
"""
