"""Cluster mode: corosync (membership, agreed order, quorum) as values."""
