"""`make bench`: vTPM Keeper's figures as ratios against the raw limits of this machine."""
