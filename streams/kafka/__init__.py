"""Kafka plumbing under the roles: the Sender, readers outside consumer groups, the broker data epoch, the embedded broker."""
