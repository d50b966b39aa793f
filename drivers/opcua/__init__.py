"""OPC UA source: subscriptions on asyncua with verified recovery, security, scan and a PLC simulator."""

from drivers.opcua import lean

# Before any module of this driver imports asyncua: a client does not load the server.
lean.install()
