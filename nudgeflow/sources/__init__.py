"""Input adapters: read messages, open them into envelopes, stamp them with the stream clock."""
