"""The embedded stack for a laptop (`lathe dev`) and the demo (`make demo`)."""
