"""The web console: server-rendered pages over the same requests as the API, with a
confirmation page before anything is deleted."""
