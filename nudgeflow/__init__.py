"""nudgeflow: real-time behavioral triggers for e-commerce, as Bytewax dataflows over Kafka."""

__version__ = "0.1.0"
