"""The synthetic source: seeded patient and pump streams with labelled injected events."""
