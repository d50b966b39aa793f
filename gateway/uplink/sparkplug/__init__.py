"""A Sparkplug B (Eclipse Sparkplug 3.0) edge node: the uplink encoding SCADA hosts read natively.

:mod:`.codec` builds topics and payloads (the ``sparkplug_b.proto`` schema compiled into
``sparkplug_b_pb2``), :mod:`.state` keeps bdSeq and the announced metrics across restarts, and
:mod:`.node` runs the session state machine on the uplink's connection.  See ``docs/sparkplug.md``.
"""
