"""Mailbox: a durable, per-thread run mailbox on NATS JetStream."""

__version__ = "0.1.0"
