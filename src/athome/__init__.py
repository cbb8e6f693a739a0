"""athome: Learning@Home-style volunteer training of mixture-of-experts models over the hivemind DHT."""

__version__ = "0.1.0"
