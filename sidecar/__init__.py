"""Proviso sidecar: decides, before an agent acts, whether a tool call may go ahead."""
