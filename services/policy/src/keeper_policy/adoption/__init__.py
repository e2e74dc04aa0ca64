"""Adoption: domains vTPM Keeper did not define, registered from their XML and placed where
they run, without redefining or restarting them."""
