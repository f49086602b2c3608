"""The expert-parallel seam: the ExpertBackend protocol an MoE layer calls (backend.py), experts in this
process (local.py), experts on shards reached through a transport (sharded.py), reading a shard's
experts from a checkpoint (loading.py), and counting routed tokens (routing_counter.py)."""
