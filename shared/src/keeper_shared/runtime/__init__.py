"""Runtime of every service: settings, logging, start-up waits, the runner, CPU offload."""
