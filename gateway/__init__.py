"""edgetwin gateway core: samples, pipeline, anonymization, durable outbox and supervision."""

__version__ = "0.1.0"
