"""Hosts as policy knows them: their heartbeats, and lost hosts fenced and cleaned up."""
