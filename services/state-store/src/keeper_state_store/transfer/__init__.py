"""Moving state in and out: restores, exports and imports (bundles), clones."""
