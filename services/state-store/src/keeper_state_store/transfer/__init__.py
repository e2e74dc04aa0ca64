"""Moving state in and out: restore plans, exports and imports (bundles), clones."""
