"""Where a VM runs: placement rules, the place workflow, live migrations, its domain XML."""
