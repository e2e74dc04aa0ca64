"""The policy service: approves TPMs, places, stops and snapshots VMs, fences lost hosts."""
