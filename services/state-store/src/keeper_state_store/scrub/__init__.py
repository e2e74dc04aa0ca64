"""Background verification of stored versions, and the replica's background tasks."""
