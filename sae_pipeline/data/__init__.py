"""Data in: sources, the contract, validation with quarantine, snapshots, batches and scaling."""
