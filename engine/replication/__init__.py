"""Replication on NATS JetStream (docs/replication.md)."""
