"""The twin's side: decode what gateways publish, check their sequences, keep the latest state."""
