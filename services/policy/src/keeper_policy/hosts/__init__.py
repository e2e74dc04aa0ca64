"""Hosts as policy knows them: their heartbeats, lost hosts declared and cleaned up."""
