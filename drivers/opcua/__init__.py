"""OPC UA source: subscriptions on asyncua with verified recovery, security, scan and a PLC simulator."""
