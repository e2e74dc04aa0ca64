"""What the host's domains imply when the agent reads them all again: facts it missed, and
the domains vTPM Keeper did not place."""
